"""The docker-compose demo describes the same processes as the native federation (no Docker
engine runs on the build machines: the file is checked structurally, and with `docker compose
config` where that command exists)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fed_ser.deployment.federation import LocalFederation

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` / ``--flag`` -> {name: value}."""
    out, i = {}, 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if not eq and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                value, i = str(args[i + 1]), i + 1
            out[name] = value
        i += 1
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> LocalFederation:
    return LocalFederation(tmp_path_factory.mktemp("fed"), 3)  # writes certificates and keys; starts nothing


def test_compose_runs_the_native_superlink_with_tls_and_node_auth(compose, native):
    link = compose["services"]["superlink"]
    assert link["image"] == "flwr/superlink:1.41.0"
    ours, theirs = _flags(native.superlink_command()), _flags(link["command"])
    security = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"}
    assert security <= set(ours) and security <= set(theirs)
    assert set(ours) - {"--host", "--port"} <= set(theirs)  # same process, container paths and ports
    assert "--insecure" not in theirs
    assert all(p.startswith("127.0.0.1:") for p in link.get("ports", []))  # never published beyond loopback


def test_compose_supernodes_hold_one_shard_each_with_their_own_key(compose, native):
    nodes = sorted(k for k in compose["services"] if re.fullmatch(r"supernode-\d+", k))
    assert nodes == [f"supernode-{i}" for i in range(native.num_nodes)]
    keys = set()
    for i, name in enumerate(nodes):
        svc = compose["services"][name]
        assert svc["image"] == "flwr/supernode:1.41.0"
        ours, theirs = _flags(native.supernode_command(i)), _flags(svc["command"])
        assert set(ours) - {"--max-retries", "--host", "--port"} <= set(theirs)
        assert theirs["--node-config"] == ours["--node-config"] == f"partition-id={i} num-partitions={len(nodes)}"
        assert "--insecure" not in theirs
        keys.add(theirs["--auth-supernode-private-key"])
        assert f"clientapp-{i}" in compose["services"]  # its ClientApp runtime (the app image)
    assert len(keys) == len(nodes)


def test_app_image_is_built_on_flowers_pinned_superexec_image():
    dockerfile = (ROOT / "docker" / "Dockerfile.superexec").read_text()
    assert re.search(r"^ARG FLWR_VERSION=1\.41\.0$", dockerfile, re.M)
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", dockerfile, re.M)


@pytest.mark.skipif(shutil.which("docker") is None
                    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
                    reason="the docker compose CLI is not installed here")
def test_docker_compose_config_accepts_the_file():
    res = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_flower_process_posts_telemetry_natively_or_in_compose(compose, native):
    # Flower sends usage events to telemetry.flower.ai unless FLWR_TELEMETRY_ENABLED=0; nothing may leave 127.0.0.1
    assert native.env["FLWR_TELEMETRY_ENABLED"] == "0"
    ours = (ROOT / "docker" / "Dockerfile.superexec").read_text()
    assert "ENV FLWR_TELEMETRY_ENABLED=0" in ours
    for name, svc in compose["services"].items():
        if svc["image"].startswith("fed-ser-superexec"):
            continue  # the image's ENV (an explicit environment entry would need to repeat it)
        assert (svc.get("environment") or {}).get("FLWR_TELEMETRY_ENABLED") == "0", name
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
