"""The docker-compose demo: the same processes as the native federation, with least privilege (no Docker
engine runs on the build machines: the file is checked structurally against the rules of docs/security.md,
what setup writes into each volume is checked by running it, and `docker compose config` runs where it exists)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from fed_ser.deployment.federation import LocalFederation

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
#: the containers that share the SuperLink's network namespace, so reach its Control API: the deployer's own
DEPLOYER_SIDE = {"serverapp", "fleet-gateway", "register", "run"}


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


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """volume -> (where it is mounted, read-only?)."""
    out = {}
    for v in svc.get("volumes", []):
        name, target, *mode = v.split(":")
        out[name] = (target, mode == ["ro"])
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> LocalFederation:
    fed = LocalFederation(tmp_path_factory.mktemp("fed"), 3)  # writes certificates and keys; starts nothing
    yield fed
    fed.close()


def _nodes(compose: dict) -> list[str]:
    return sorted(k for k in compose["services"] if re.fullmatch(r"supernode-\d+", k))


def test_compose_runs_the_native_superlink_with_tls_and_node_auth_on_its_own_loopback(compose, native):
    link = compose["services"]["superlink"]
    assert link["image"] == "flwr/superlink:1.41.0"
    ours, theirs = _flags(native.superlink_command()), _flags(link["command"])
    security = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"}
    assert security <= set(ours) and security <= set(theirs)
    assert set(ours) <= set(theirs)  # same process, container paths and ports
    assert "--insecure" not in theirs and theirs["--host"] == "127.0.0.1"  # its Control API on its own loopback
    assert link["networks"] == ["fleet"]
    assert not any("ports" in svc for svc in compose["services"].values())  # nothing published on the host
    shared = {n for n, svc in compose["services"].items() if svc.get("network_mode") == "service:superlink"}
    assert shared == DEPLOYER_SIDE  # who can reach the Control API at all
    assert _mounts(link) == {"ca": ("/ca", True), "superlink-tls": ("/tls", True), "state": ("/state", False)}


def test_the_nodes_reach_the_superlink_through_the_fleet_only_gateway(compose):
    gateway = compose["services"]["fleet-gateway"]
    flags = _flags(gateway["command"])
    assert gateway["entrypoint"] == ["python", "-m", "fed_ser.deployment.gateway"]
    assert flags["--upstream"] == "127.0.0.1:8000" and flags["--listen"] == "0.0.0.0:9443"
    assert _mounts(gateway) == {"ca": ("/ca", True), "gateway-tls": ("/tls", True)}  # its own key, not the SuperLink's
    assert compose["networks"]["fleet"] == {"internal": True}


def test_each_supernode_mounts_only_the_ca_and_its_own_key_and_each_clientapp_only_its_shard(compose, native):
    nodes = _nodes(compose)
    assert nodes == [f"supernode-{i}" for i in range(native.num_nodes)]
    for i, name in enumerate(nodes):
        svc = compose["services"][name]
        assert svc["image"] == "flwr/supernode:1.41.0"
        ours, theirs = _flags(native.supernode_command(i)), _flags(svc["command"])
        assert set(ours) - {"--max-retries"} <= set(theirs)
        assert theirs["--node-config"] == ours["--node-config"] == f"partition-id={i} num-partitions={len(nodes)}"
        assert "--insecure" not in theirs and theirs["--superlink"] == "superlink:9443"  # the gateway
        assert theirs["--host"] == "127.0.0.1"  # ClientAppIo never on 0.0.0.0
        assert _mounts(svc) == {"ca": ("/ca", True), f"node{i}-key": ("/key", True)}
        assert theirs["--auth-supernode-private-key"] == f"/key/node{i}.key" and svc["networks"] == ["fleet"]
        app = compose["services"][f"clientapp-{i}"]  # its ClientApp runtime (the app image), in its own namespace
        assert app["network_mode"] == f"service:{name}" and _flags(app["command"])["--runtime-api-address"] == "127.0.0.1:9094"
        assert _mounts(app) == {f"shard{i}": ("/data", True)}


def test_only_the_serverapp_sees_the_whole_data_and_the_recorded_updates(compose):
    for volume in ("results", "server-data"):
        users = {n for n, svc in compose["services"].items() if volume in _mounts(svc)} - {"setup"}
        assert users == {"serverapp"}, volume
    assert _mounts(compose["services"]["serverapp"])["results"] == ("/results", False)


def test_every_key_volume_is_mounted_by_its_one_user_and_setup_writes_each_volume(compose):
    users: dict[str, set[str]] = {}
    for n, svc in compose["services"].items():
        for volume in _mounts(svc):
            users.setdefault(volume, set()).add(n)
    for i in range(len(_nodes(compose))):
        assert users[f"node{i}-key"] == {"setup", f"supernode-{i}"} and users[f"shard{i}"] == {"setup", f"clientapp-{i}"}
    assert users["superlink-tls"] == {"setup", "superlink"} and users["gateway-tls"] == {"setup", "fleet-gateway"}
    setup = compose["services"]["setup"]
    assert setup["network_mode"] == "none"
    written = {v for v, (target, _) in _mounts(setup).items() if target == f"/out/{v}"}
    assert written | {"setup-work", "results"} == set(compose["volumes"])  # results: the image's /results, owned by app
    dockerfile = (ROOT / "docker" / "Dockerfile.superexec").read_text()
    assert all(f"/out/{v}" in dockerfile for v in written) and "/results" in dockerfile


def test_setup_writes_each_volume_what_its_services_need_and_no_ca_key(tmp_path, monkeypatch):
    """fed-ser-deploy-setup's volumes, from a small prepared data set: private keys 0600 in 0700 folders, one
    key per node folder, one client per shard (the others' genders blanked), the CA key nowhere."""
    from fed_ser.data.federated import FederatedData
    from fed_ser.experiments.deploy import write_compose_volumes

    rng = np.random.default_rng(0)
    data = FederatedData(X=rng.normal(size=(12, 5)).astype(np.float32), y=np.arange(12) % 4,
                         client=np.array([0] * 4 + [1] * 4 + [-1] * 4), split=np.array([0, 0, 1, 0] * 2 + [2] * 4),
                         client_speaker=np.array(["s0", "s1"]), client_gender=np.array(["F", "M"]), client_corpus=np.array(["c", "c"]))
    prepared = tmp_path / "prep" / "data.npz"
    prepared.parent.mkdir()
    data.save(prepared)
    out = tmp_path / "out"
    write_compose_volumes(out, tmp_path / "work", 2, prepared)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"ca/ca.crt", "superlink-tls/server.pem", "superlink-tls/server.key", "gateway-tls/gateway.pem",
                     "gateway-tls/gateway.key", "node0-key/node0.key", "node1-key/node1.key", "pubkeys/node0.pub",
                     "pubkeys/node1.pub", "server-data/prepared/data.npz", "shard0/prepared/data.npz", "shard1/prepared/data.npz"}
    assert not list(tmp_path.rglob("ca.key"))
    for key in ("superlink-tls/server.key", "gateway-tls/gateway.key", "node0-key/node0.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600 and stat.S_IMODE((out / key).parent.stat().st_mode) == 0o700
    shard = FederatedData.load(out / "shard1" / "prepared" / "data.npz")
    assert set(shard.client) == {1} and shard.num_clients == 2 and list(shard.client_gender) == ["", "M"]
    np.testing.assert_array_equal(shard.client_rows(1, 0)[0], data.client_rows(1, 0)[0])


def test_app_image_is_built_on_flowers_pinned_superexec_image():
    dockerfile = (ROOT / "docker" / "Dockerfile.superexec").read_text()
    assert re.search(r"^ARG FLWR_VERSION=1\.41\.0$", dockerfile, re.M)
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", dockerfile, re.M)
    assert dockerfile.rstrip().splitlines()[-2] == "USER app"  # the runtime never runs as root


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return [shutil.which("docker-compose")] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose_cli() is None, reason="neither `docker compose` nor docker-compose is installed here")
def test_docker_compose_config_accepts_the_file(tmp_path):
    path = COMPOSE
    if _compose_cli() != ["docker", "compose"]:  # docker-compose 1.29 (PyPI) knows the spec but not the top-level name
        path = COMPOSE.parent / f".{tmp_path.name}.compose.yaml"  # beside it: the build context stays ..
        path.write_text("".join(line for line in COMPOSE.read_text().splitlines(True) if not line.startswith("name:")))
    try:
        res = subprocess.run([*_compose_cli(), "-f", str(path), "config", "--quiet"], capture_output=True, text=True)
    finally:
        if path != COMPOSE:
            path.unlink()
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
