"""``fed-ser-deploy`` and ``fed-ser-deploy-setup``: the app on a real federation, from the Hydra config.

The deployment layer (:mod:`fed_ser.deployment`) knows processes, certificates and networks; this module
is the thin driver above it: compose the config, prepare the data, run it on a
:class:`~fed_ser.deployment.federation.LocalFederation` and report seconds per round (``fed-ser-deploy``,
``conf/deploy.yaml``), or write what the docker-compose demo's volumes hold (``fed-ser-deploy-setup``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from fed_ser.deployment.certificates import make_certificates, make_node_key, private_dir, write_private, write_public
from fed_ser.deployment.federation import HOST, ISOLATIONS, LocalFederation, write_connection
from fed_ser.deployment.isolation import IsolationUnavailable
from fed_ser.deployment.processes import Stopped, WorkdirBusy, stop_on_signals
from fed_ser.deployment.shards import write_shards
from fed_ser.experiments.cli import seconds_per_round, with_overwrite_flag
from fed_ser.experiments.config import console, load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.io import atomic_write_json
from fed_ser.recording.overwrite import check_overwrite
from fed_ser.run.from_config import run_settings
from fed_ser.run.settings import ConfigError, RunSettings

#: the ports of the compose demo (docker/compose.yaml): the SuperLink on its container's loopback, the gateway for the nodes
COMPOSE_SUPERLINK, COMPOSE_GATEWAY = "127.0.0.1:8000", "superlink:9443"


def _check(cfg: DictConfig) -> int:
    nodes = cfg.deploy.nodes
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"deploy.nodes: must be an integer >= 1, got {nodes!r}")
    if cfg.deploy.isolation not in ISOLATIONS:
        raise ConfigError(f"deploy.isolation: {cfg.deploy.isolation!r} is not one of {ISOLATIONS}")
    for key in ("startup_timeout", "run_timeout"):
        if not float(cfg.deploy[key]) > 0:
            raise ConfigError(f"deploy.{key}: must be > 0 seconds, got {cfg.deploy[key]!r}")
    return nodes


def _summary(res: dict, s: RunSettings | None = None) -> dict:
    out = {"wall_seconds": res["wall_seconds"], "discover_seconds": res.get("discover_seconds"),
           "seconds_per_round": seconds_per_round(res), "final": res["final"]}
    if s is not None:
        privacy = res.get("privacy") or {}
        out.update(short_rounds=res.get("short_rounds"), recorded_updates=res.get("recorder", {}).get("updates"), secagg=s.secagg,
                   privacy={k: privacy.get(k) for k in ("mode", "spent_epsilon_max", "delta", "epsilon_server", "guarantee")}
                   if privacy else None)
    return out


def deploy(cfg: DictConfig) -> dict:
    """Prepare the data, run it on a local SuperLink + SuperNodes, and report seconds per round.

    With ``deploy.compare_simulation`` the same settings also run in Flower's simulation engine,
    so the report gives the deployment (HTTPS) vs simulation for the same configuration.
    """
    d, nodes = cfg.deploy, _check(cfg)
    out = Path(cfg.out_dir).resolve()
    s = replace(run_settings(cfg, Path("unprepared.npz"), str(out / "deployment"), str(out / "deployment" / "updates")),
                min_available=nodes, resume=False)
    check_overwrite(s)  # before anything runs: a rerun never drops what an earlier one recorded, unless told to
    prepared = prepare(cfg, [cfg.dataset.name], int(cfg.fold)).resolve()
    s = replace(s, prepared=str(prepared))
    report: dict = {"nodes": nodes, "rounds": int(cfg.fl.rounds), "tls": not bool(d.insecure),
                    "supernode_auth": not bool(d.insecure), "warm_apps": bool(d.warm_apps), "isolation": str(d.isolation)}
    print(f"[deploy] SuperLink + {nodes} SuperNodes on {HOST} ({'insecure' if d.insecure else 'TLS + node auth'}, "
          f"{'a private network' if d.isolation == 'netns' else 'the shared loopback'}), {s.rounds} rounds -> {out / 'deployment'}", flush=True)
    t0 = time.perf_counter()
    with LocalFederation(Path(d.workdir).resolve(), nodes, insecure=bool(d.insecure), startup_timeout=float(d.startup_timeout),
                         warm_apps=bool(d.warm_apps), isolation=str(d.isolation)) as fed:
        report["startup_seconds"] = time.perf_counter() - t0
        res = fed.run(s.to_run_config(), timeout=float(d.run_timeout))
        print(res.stdout[-2000:], flush=True)
    report["deployment"] = _summary(json.loads((out / "deployment" / "results.json").read_text()), s)
    if d.compare_simulation:
        from fed_ser.flower.simulation import simulate  # Flower's simulation engine (and Ray) load only for the comparison

        sim = replace(s, out_dir=str(out / "simulation"), recorder_dir=str(out / "simulation" / "updates"))
        check_overwrite(sim)
        simulate(sim, nodes, cpus_per_client=float(cfg.simulation.cpus_per_client))
        report["simulation"] = _summary(json.loads((out / "simulation" / "results.json").read_text()))
        report["deployment_vs_simulation"] = report["deployment"]["seconds_per_round"] / report["simulation"]["seconds_per_round"]
    atomic_write_json(out / "deploy.json", report)
    _print_report(report, bool(d.insecure), out)
    return report


def _print_report(report: dict, insecure: bool, out: Path) -> None:
    dep = report["deployment"]
    transport = "an unencrypted connection (deploy.insecure=true: no TLS, no node authentication)" if insecure else "HTTPS"
    line = (f"[deploy] {dep['seconds_per_round']:.2f} s/round over {transport} "
            f"(after {dep['discover_seconds'] or 0:.1f} s for the nodes' first replies)") + (" with SecAgg+" if dep["secagg"] else "")
    if dep["privacy"]:
        line += f", {dep['privacy']['mode']}: epsilon {dep['privacy']['spent_epsilon_max']:.2f} at delta {dep['privacy']['delta']}"
    if "simulation" in report:
        line += (f", {report['simulation']['seconds_per_round']:.2f} s/round in simulation "
                 f"({report['deployment_vs_simulation']:.1f}x)")
    print(line + f"; report: {out / 'deploy.json'}", flush=True)


@console
def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-deploy deploy.nodes=3 fl.rounds=5 [deploy.insecure=true] [--overwrite]`` (conf/deploy.yaml).

    SIGTERM and SIGHUP stop it as Ctrl-C does: every process of the federation is stopped."""
    overrides = with_overwrite_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        with stop_on_signals():
            deploy(load_config(overrides, "deploy"))
    except (IsolationUnavailable, WorkdirBusy) as exc:
        raise ConfigError(str(exc)) from None
    except Stopped as exc:
        print(f"[deploy] {exc}: every process of the federation stopped", file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None


def _move_private(src: Path, dst_dir: Path) -> Path:
    """Copy a secret into ``dst_dir`` (0700) as a fresh 0600 file, then remove the source."""
    dst = private_dir(dst_dir) / src.name
    write_private(dst, src.read_bytes())
    src.unlink()
    return dst


def write_compose_volumes(out: Path, work: Path, nodes: int, prepared: Path) -> dict[str, Path]:
    """What each service of ``docker/compose.yaml`` mounts, one folder per volume under ``out``; the CA key
    is never written, and each folder holds only what its services need (the rules are in docs/security.md)."""
    certs = make_certificates(work / "certs", hostnames=("superlink",), servers=("server", "gateway"))
    write_public(private_dir(out / "ca") / "ca.crt", certs["ca"].read_bytes())
    for name, volume in (("server", "superlink-tls"), ("gateway", "gateway-tls")):
        write_public(private_dir(out / volume) / certs[f"{name}_cert"].name, certs[f"{name}_cert"].read_bytes())
        _move_private(certs[f"{name}_key"], out / volume)
    shutil.rmtree(work / "certs")
    pubkeys = private_dir(out / "pubkeys")
    for i in range(nodes):
        _, pub = make_node_key(out / f"node{i}-key", f"node{i}")
        write_public(pubkeys / pub.name, pub.read_bytes())
        pub.unlink()
    (out / "server-data" / "prepared").mkdir(parents=True, exist_ok=True)
    shutil.copy2(prepared, out / "server-data" / "prepared" / prepared.name)
    write_shards(prepared, [out / f"shard{i}" / "prepared" for i in range(nodes)])
    return {"ca": out / "ca" / "ca.crt", "deployer": private_dir(out / "deployer")}


@console
def setup_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-deploy-setup --out DIR [--nodes 3] [overrides]``: what the docker-compose demo's
    volumes hold: TLS material (a CA certificate, the SuperLink's and the gateway's certificate and key),
    one key per SuperNode, the prepared data (whole for the ServerApp, one client's shard per node), the run
    config and the deployer's CLI connection. Corpora and features are built under ``--work``."""
    p = argparse.ArgumentParser(prog="fed-ser-deploy-setup", description=setup_main.__doc__)
    p.add_argument("--out", type=Path, required=True, help="one folder per compose volume is written here")
    p.add_argument("--work", type=Path, required=True, help="scratch: corpora, feature cache, prepared data")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/deploy.yaml")
    a = p.parse_args(argv)
    if a.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {a.nodes}")
    cfg = load_config([f"data.root={a.work}/corpora", f"data.cache={a.work}/cache", f"data.prepared_dir={a.work}/prepared",
                       *a.overrides], "deploy")
    prepared = prepare(cfg, [cfg.dataset.name], int(cfg.fold)).resolve()
    paths = write_compose_volumes(a.out, a.work, a.nodes, prepared)
    s = run_settings(cfg, Path("/data/prepared") / prepared.name, "/results/run", "/results/run/updates")
    flat = {**s.to_run_config(), "fl.min_available": a.nodes}
    (paths["deployer"] / "run-config.txt").write_text(" ".join(f"{k}={json.dumps(v)}" for k, v in flat.items()) + "\n")
    write_connection(paths["deployer"], COMPOSE_SUPERLINK, Path("/ca/ca.crt"))
    print(f"[deploy] compose volumes under {a.out}: TLS (CA key discarded), {a.nodes} node keys, data {prepared.name} "
          f"(one shard per node), run config and connection in {paths['deployer']}")
