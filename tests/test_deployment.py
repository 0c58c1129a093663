"""A real local federation: SuperLink + SuperNodes as separate processes on 127.0.0.1, over TLS
with SuperNode authentication; faults (a node killed mid-run, an unregistered node)."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.deployment.federation import PROJECT, LocalFederation, stage_app
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


def test_tls_authenticated_federation_runs_secagg_then_trains_records_and_outlives_a_killed_node(prepared, tmp_path):
    """One federation (each start costs a SuperLink, three SuperNodes and their ClientApp processes):
    first SecAgg+, then a FedSGD run that records every update from the wire and finishes when a node dies."""
    # SecAgg+ (four message stages a round over HTTPS) with LocalDpMod inside secaggplus_mod: the server
    # records no update, only the round's unmasked (locally noised) sum
    secure = _settings(prepared, tmp_path / "secagg", rounds=1, nodes=3, round_timeout=120.0, secagg=True,
                       flower_dp_mode="local")
    # the round timeout must outlast round 1 on a loaded 2-core CI box (12 s once left two nodes out when each
    # message's ClientApp process imported torch; forked warm, a round takes ~7 s); round 2 then waits it out
    # for the node killed after round 1
    s = _settings(prepared, tmp_path / "run", rounds=2, nodes=3, round_timeout=30.0)
    with LocalFederation(tmp_path / "fed", 3) as fed:
        assert fed.certs is not None and fed.keys is not None  # secure unless asked otherwise
        listed = fed.flwr("supernode", "list", "fedser").stdout
        out_secagg = fed.run(secure.to_run_config(), timeout=400).stdout
        run = fed.start_run(s.to_run_config())
        ckpt = tmp_path / "run" / "checkpoint.npz"
        deadline = time.monotonic() + 300
        while not ckpt.exists():  # round 1 finished with every node
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        fed.stop("supernode2", signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
        assert run.returncode == 0, out[-3000:]
    assert listed  # the CLI reached the SuperLink over TLS
    for i in range(3):  # every node installed the app into its own FLWR_HOME, as separate machines would
        assert list((tmp_path / "fed" / f"supernode{i}_home" / "apps").iterdir())
    forked = (tmp_path / "fed" / "forkserver.log").read_text()
    # every app process was forked warm: the 2 runs' ServerApps; per node the client-id query and SecAgg+'s four
    # stages, then the query, two trainings and the evaluation (the killed node: the query and its first training)
    assert forked.count("flwr-serverapp as pid") == 2 and forked.count("flwr-clientapp as pid") == 3 * 5 + 2 * 4 + 2, forked

    assert "round 1/1: 3/3 replies" in out_secagg, out_secagg[-3000:]
    res = json.loads((tmp_path / "secagg" / "results.json").read_text())
    assert [r["clients"] for r in res["rounds"]] == [[0, 1, 2]]
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


def test_a_supernode_with_an_unregistered_key_is_refused(prepared, tmp_path):
    fed = LocalFederation(tmp_path / "fed", 2, registered=[0])
    with fed:
        stranger = fed.procs["supernode1"]
        deadline = time.monotonic() + 120
        while stranger.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stranger.returncode not in (None, 0)
        assert "Failed to activate SuperNode" in (tmp_path / "fed" / "supernode1.log").read_text()
        nodes = json.loads(fed.flwr("supernode", "list", "fedser", "--format", "json").stdout)["nodes"]
    assert len(nodes) == 1  # only the registered node is known


def test_cleanup_stops_every_process_even_when_one_will_not_die(tmp_path, monkeypatch):
    """A wait that times out after SIGKILL must not leave the SuperLink running or a log file open."""
    import subprocess

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
    import os
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


def test_the_staged_app_is_the_fab_flower_builds_from_the_project(tmp_path):
    staged = stage_app(tmp_path / "app")
    paths = _fab_paths(staged)
    assert paths == _fab_paths(PROJECT)  # the same files, with the same bytes
    assert all((staged / p).read_bytes() == (PROJECT / p).read_bytes() for p in paths)
    assert "fed_ser/flower/client_app.py" in paths and not any(p.startswith(("tests/", "benchmarks/")) for p in paths)
