"""A real local federation: SuperLink + SuperNodes as separate processes on 127.0.0.1 of a private network,
over TLS with SuperNode authentication; outsiders (holding the CA certificate, on the host or at the nodes'
gateway) are kept out; faults (a node killed mid-run, an unregistered node, the deployer stopped by SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.deployment.certificates import make_node_key
from fed_ser.deployment.federation import MARKER, PROJECT, LocalFederation, _bin, stage_app
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import RunSettings


@pytest.fixture(scope="module")
def prepared(corpora, feature_cache, tmp_path_factory):
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}"])
    return prepare(cfg, ["crema_d"], fold=0).resolve()


def _settings(prepared, out, rounds: int, nodes: int, **kw) -> RunSettings:
    return RunSettings(prepared=str(prepared), algorithm="fedsgd", rounds=rounds, fraction=1.0, eval_every=rounds,
                       min_available=nodes, recorder_dir=str(out / "updates"), out_dir=str(out), resume=False, **kw)


EVIL_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "evil:app"
clientapp = "evil:client"

[tool.flwr.app.config]
"""

EVIL_APP = """from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    open({mark!r}, "w").write("the outsider's code ran as the deployer")
"""


def _outsider(folder: Path, ca: Path, address: str) -> tuple[dict, Path, Path]:
    """Someone holding only the public CA certificate: a fresh FLWR_HOME naming the SuperLink, a node key of
    their own and an app of their own (which, if it ever ran, would leave the file ``PWNED`` behind)."""
    home = folder / "flwr_home"
    home.mkdir(parents=True)
    (home / "ca.crt").write_bytes(ca.read_bytes())
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedser"\n\n[superlink.fedser]\naddress = "{address}"\n'
                                      f'root-certificates = "{home / "ca.crt"}"\n')
    _, pub = make_node_key(folder / "keys", "outsider")
    app = folder / "evil"
    app.mkdir()
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (app / "evil.py").write_text(EVIL_APP.format(mark=str(folder / "PWNED")))
    return {"PATH": os.environ["PATH"], "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}, pub, app


def _attempt(fed: LocalFederation, folder: Path, address: str, inside: bool) -> list[subprocess.Popen]:
    """The outsider registers a node and starts a run (both at once), from the host (``inside=False``), or from
    within the federation's network at ``address`` (a party that reaches the nodes' gateway)."""
    env, pub, app = _outsider(folder, fed.certs["ca"], address)
    wrap = fed._wrap if inside else (lambda cmd: cmd)
    return [subprocess.Popen(wrap([_bin("flwr"), *args]), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for args in (["supernode", "register", str(pub), "fedser"], ["run", str(app), "fedser"])]


def _outcome(attempts: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each attempt's exit code and output, once it ended."""
    outputs = [p.communicate(timeout=120)[0] for p in attempts]
    return [(p.returncode, out) for p, out in zip(attempts, outputs)]


def test_tls_authenticated_federation_keeps_outsiders_out_runs_secagg_then_trains_records_and_outlives_a_killed_node(prepared, tmp_path):
    """One federation (each start costs a SuperLink, four SuperNodes and their ClientApp processes): outsiders
    fail to register a node or start a run, node 3's unregistered key is refused, node 1 reaches the SuperLink
    through the Fleet-only gateway; then SecAgg+, then a FedSGD run that records every update from the wire
    and finishes when a node dies."""
    # SecAgg+ (four message stages a round over HTTPS) with LocalDpMod inside secaggplus_mod: the server
    # records no update, only the round's unmasked (locally noised) sum
    secure = _settings(prepared, tmp_path / "secagg", rounds=1, nodes=3, round_timeout=120.0, secagg=True,
                       flower_dp_mode="local")
    # the round timeout must outlast round 1 (a few seconds: the SuperNodes poll every 3 s) on a loaded 2-core CI
    # box; round 2 then waits it out for the node killed after round 1, and so does the last round's evaluation
    s = _settings(prepared, tmp_path / "run", rounds=2, nodes=3, round_timeout=12.0)
    with LocalFederation(tmp_path / "fed", 4, registered=[0, 1, 2], gateway_nodes=(1,)) as fed:
        assert fed.certs is not None and fed.keys is not None and fed.isolation == "netns"  # secure unless asked otherwise
        attempts = _attempt(fed, tmp_path / "outsider", f"127.0.0.1:{fed.port}", inside=False)
        attempts += _attempt(fed, tmp_path / "node-side", f"127.0.0.1:{fed.gateway_port}", inside=True)
        out_secagg = fed.run(secure.to_run_config(), timeout=400).stdout  # while the outsiders try
        outcomes = _outcome(attempts)
        on_host, at_gateway = outcomes[:2], outcomes[2:]
        run = fed.start_run(s.to_run_config())
        ckpt = tmp_path / "run" / "checkpoint.npz"
        deadline = time.monotonic() + 300
        while not ckpt.exists():  # round 1 finished with every node
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        fed.stop("supernode2", signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
        assert run.returncode == 0, out[-3000:]
        with ThreadPoolExecutor(2) as pool:  # the CLI over TLS, its two calls at once
            listed = [pool.submit(fed.flwr, *args, "fedser", "--format", "json") for args in (["ls"], ["supernode", "list"])]
            runs, nodes = (json.loads(f.result().stdout)[key] for f, key in zip(listed, ("runs", "nodes")))
        stranger = fed.procs["supernode3"]
        deadline = time.monotonic() + 120
        while stranger.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    for code, output in on_host:  # the SuperLink's port is not on the host's loopback: nothing to connect to
        assert code != 0 and "Connection to the SuperLink is unavailable" in output, output
    for code, output in at_gateway:  # the gateway forwards the Fleet API only: the Control API is refused there
        assert code != 0 and "403 Forbidden" in output, output
    assert not (tmp_path / "outsider" / "PWNED").exists() and not (tmp_path / "node-side" / "PWNED").exists()
    assert len(runs) == 2 and len(nodes) == 3  # the deployer's two runs and three nodes, nobody else's
    _assert_none_left(str(tmp_path / "fed"))  # closed: no SuperExec, app process, fork server or holder outlives it
    assert stranger.returncode not in (None, 0)  # node 3's key was never registered
    assert "Failed to activate SuperNode" in (tmp_path / "fed" / "supernode3.log").read_text()
    for i in range(3):  # every node installed the app into its own FLWR_HOME, as separate machines would
        assert list((tmp_path / "fed" / f"supernode{i}_home" / "apps").iterdir())
    forked = (tmp_path / "fed" / "forkserver.log").read_text()
    # every app process was forked warm: the 2 runs' ServerApps; per node the client-id query and SecAgg+'s four
    # stages, then the query, two trainings and the evaluation (the killed node: the query and its first training)
    assert forked.count("flwr-serverapp as pid") == 2 and forked.count("flwr-clientapp as pid") == 3 * 5 + 2 * 4 + 2, forked

    assert "round 1/1: 3/3 replies" in out_secagg, out_secagg[-3000:]
    res = json.loads((tmp_path / "secagg" / "results.json").read_text())
    assert [r["clients"] for r in res["rounds"]] == [[0, 1, 2]]  # node 1, behind the gateway, took part
    assert res["privacy"]["mode"] == "flower:local" and res["privacy"]["epsilon_server"] > 0
    store = UpdateStore(tmp_path / "secagg" / "updates")
    assert store.updates() == [] and store.aggregate_record(1) is not None
    agg, theta = store.read(store.aggregate_record(1)), store.read(store.global_record(1))
    assert all(np.isfinite(agg[k]).all() and not np.array_equal(agg[k], theta[k]) for k in theta)

    assert "3 nodes connected, 3 hold clients [0, 1, 2]" in out and "round 1/2: 3/3 replies" in out, out[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["final"]["round"] == 2 and 0.0 <= res["final"]["test_uar"] <= 1.0
    assert {r["round"]: r["replies"] for r in res["rounds"]} == {1: 3, 2: 2}
    assert res["short_rounds"] == [2]
    store = UpdateStore(tmp_path / "run" / "updates")
    ups = store.updates()
    assert sorted((u.round, u.client) for u in ups) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]  # none from the dead node
    data = FederatedData.load(prepared)
    for u in ups:  # what was recorded from the wire is the client's gradient on its own shard
        g = store.read(u)
        assert g["dense1.weight"].shape == (256, data.X.shape[1]) and np.isfinite(g["dense1.weight"]).all()
        assert u.num_examples == len(data.client_rows(u.client, TRAIN)[0])


def _processes_marked(value: str) -> list[int]:
    """Live processes carrying ``FED_SER_FEDERATION=value`` (every process a federation starts)."""
    marker = f"{MARKER}={value}\0".encode()
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in env.read_bytes() and Path(env.parent / "stat").read_text().split()[2] != "Z":
                found.append(int(env.parent.name))
        except (OSError, IndexError):
            continue
    return found


def test_fed_ser_deploy_stopped_by_sigterm_leaves_no_process(prepared, tmp_path):
    """fed-ser-deploy as its console script runs it (the data prepared beforehand): stopped mid-run by SIGTERM, it
    stops every process it started, as Ctrl-C does: fork server, SuperLink, SuperNode, SuperExecs, the ServerApp's
    launcher and forked process, and the private network's holder (before, all but the holder stayed); and it
    releases its workdir."""
    workdir = tmp_path / "fed"
    code = ("import sys; from pathlib import Path; import fed_ser.experiments.deploy as d; "
            f"d.prepare = lambda cfg, corpora, fold: Path({str(prepared)!r}); d.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, "deploy.nodes=1", "fl.rounds=50", f"deploy.workdir={workdir}",
                             f"out_dir={tmp_path / 'out'}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    log = workdir / "forkserver.log"
    while not (log.exists() and "flwr-serverapp as pid" in log.read_text()):  # the run's ServerApp process is working
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:] if proc.poll() is not None else "slow"
        time.sleep(0.5)
    assert len(_wait_marked(str(workdir), 5)) >= 5
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]
    _assert_none_left(str(workdir))
    LocalFederation(workdir, 1, insecure=True, warm_apps=False).close()  # the workdir lock was released


def _wait_marked(marker: str, at_least: int) -> list[int]:
    """The marked processes once ``at_least`` are seen (10 s at most): a process caught mid-``exec`` (``nsenter``
    replacing itself by the command it wraps) shows an empty environment for an instant."""
    deadline = time.monotonic() + 10
    while len(found := _processes_marked(marker)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _assert_none_left(marker: str) -> None:
    deadline = time.monotonic() + 10  # the OS reaps what was killed
    while _processes_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_marked(marker) == []


def test_sighup_stops_a_federation_as_ctrl_c_does(tmp_path):
    """stop_on_signals, as fed-ser-deploy uses it, with stand-in processes (SIGHUP: the terminal closed)."""
    workdir = tmp_path / "fed"
    code = """if True:
        import sys, time
        from pathlib import Path
        from fed_ser.deployment.federation import LocalFederation
        from fed_ser.deployment.processes import Stopped, stop_on_signals
        fed = LocalFederation(Path(sys.argv[1]), 1, insecure=True, warm_apps=False)
        try:
            with stop_on_signals():
                try:
                    fed._start("superlink", ["sleep", "300"])
                    fed._start("supernode0", ["sleep", "300"])
                    print("up", flush=True)
                    time.sleep(300)
                finally:
                    fed.close()
        except Stopped as exc:
            print(exc, flush=True)
            sys.exit(3)
    """
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "up"
    assert len(_wait_marked(str(workdir), 3)) >= 3  # the two stand-ins and the network's holder
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "stopped by SIGHUP" in out, out
    _assert_none_left(str(workdir))


def test_a_second_deployment_in_the_same_workdir_is_refused(tmp_path):
    from fed_ser.deployment.processes import WorkdirBusy

    first = LocalFederation(tmp_path / "fed", 1, insecure=True, warm_apps=False)
    try:
        with pytest.raises(WorkdirBusy, match=rf"in use by another deployment \(pid {os.getpid()}\)"):
            LocalFederation(tmp_path / "fed", 1, insecure=True, warm_apps=False)
    finally:
        first.close()
    LocalFederation(tmp_path / "fed", 1, insecure=True, warm_apps=False).close()  # released: the next one may


def test_cleanup_stops_every_process_even_when_one_will_not_die(tmp_path, monkeypatch):
    """A wait that times out after SIGKILL must not leave the SuperLink running or a log file open."""
    fed = LocalFederation(tmp_path / "fed", 1, insecure=True)
    stuck = fed._start("supernode0", ["sleep", "300"])
    link = fed._start("superlink", ["sleep", "300"])
    real_wait = subprocess.Popen.wait

    def never(self, timeout=None):  # this node's process cannot be reaped in time
        if self is stuck:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", never)
    fed.close()
    monkeypatch.setattr(subprocess.Popen, "wait", real_wait)
    assert link.wait(5) is not None and stuck.wait(5) is not None  # both were killed
    assert not fed.procs and all(log.closed for log in fed.logs_open)


def _fab_paths(folder) -> list[str]:
    """The files Flower's own filter puts in a FAB built from ``folder`` (its walk, minus the virtual
    environments, run outputs and git objects it would walk only to drop)."""
    import tomllib

    from flwr.cli.build import get_filtered_fab_paths

    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("runs", "data", "outputs", "multirun", "__pycache__")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, folder)] = path
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    return sorted(get_filtered_fab_paths(files, config))


def test_the_staged_app_is_the_fab_flower_builds_from_the_project_in_a_fresh_folder(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "mine.txt").write_text("not the stager's to remove")
    staged = stage_app(tmp_path)
    again = stage_app(tmp_path)
    assert staged != again and staged.parent == tmp_path and (tmp_path / "app" / "mine.txt").exists()
    paths = _fab_paths(staged)
    assert paths == _fab_paths(PROJECT)  # the same files, with the same bytes
    assert all((staged / p).read_bytes() == (PROJECT / p).read_bytes() for p in paths)
    assert "fed_ser/flower/client_app.py" in paths and not any(p.startswith(("tests/", "benchmarks/")) for p in paths)


def test_keys_are_born_private_without_a_later_chmod(tmp_path, monkeypatch):
    """Created 0600 (O_CREAT | O_EXCL) in 0700 folders: even with umask 0 and every chmod a no-op, no key is
    ever readable by others; the CA key is never written."""
    import stat

    from fed_ser.deployment.certificates import make_certificates, make_node_keys

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    old = os.umask(0)
    try:
        certs = make_certificates(tmp_path / "certs")
        keys = make_node_keys(tmp_path / "keys", 2)
    finally:
        os.umask(old)
    for secret in (certs["key"], keys[0][0], keys[1][0]):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    for folder in (tmp_path / "certs", tmp_path / "keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not list(tmp_path.rglob("ca.key")) and not list(tmp_path.rglob("*.tmp"))


def test_certificates_are_renewed_when_expiring_or_named_for_other_hosts_and_never_written_through_a_link(tmp_path):
    from cryptography import x509

    from fed_ser.deployment.certificates import make_certificates

    def cert(paths):
        return x509.load_pem_x509_certificate(paths["cert"].read_bytes())

    first = cert(make_certificates(tmp_path / "c", hostnames=("superlink",))).serial_number
    again = cert(make_certificates(tmp_path / "c", hostnames=("superlink",))).serial_number
    assert again == first  # valid, same names: the CA the nodes trust stays
    renamed = cert(make_certificates(tmp_path / "c", hostnames=("gateway",)))
    assert renamed.serial_number != first
    names = set(renamed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    assert names == {"localhost", "gateway"}
    short = cert(make_certificates(tmp_path / "d", days=0)).serial_number  # expires now: renewed before the next start
    assert cert(make_certificates(tmp_path / "d")).serial_number != short
    (tmp_path / "c" / "ca.key").write_text("an older version's CA key")
    victim = tmp_path / "victim"
    victim.write_text("not a key")
    (tmp_path / "c" / "server.key").unlink()
    (tmp_path / "c" / "server.key").symlink_to(victim)  # planted where the key goes
    make_certificates(tmp_path / "c", hostnames=("gateway",))
    assert victim.read_text() == "not a key" and not (tmp_path / "c" / "server.key").is_symlink()
    assert not (tmp_path / "c" / "ca.key").exists()
