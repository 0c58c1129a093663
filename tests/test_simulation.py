"""A short Flower simulation on Ray, through the same CLI path a user runs."""

from __future__ import annotations

import json

import pytest

from fed_ser.data.federated import FederatedData
from fed_ser.experiments.cli import load_config, run_fl, run_vectorized_fl
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.store import UpdateStore, max_difference


@pytest.fixture(scope="module")
def cfg_and_data(corpora, feature_cache, tmp_path_factory):
    prepared_dir = tmp_path_factory.mktemp("prepared")
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={prepared_dir}", "dataset=iemocap", "shards.iemocap=2",
                       "fl.fraction=0.25", "fl.eval_every=2", "fl.rounds=3"])
    return cfg, prepare(cfg, ["iemocap"], fold=1)


def test_short_fedsgd_simulation_records_every_update_and_resumes(cfg_and_data, tmp_path):
    cfg, prepared = cfg_and_data
    data = FederatedData.load(prepared)
    assert data.num_clients == 16  # 8 training speakers x 2 shards
    out = tmp_path / "run"
    res = run_fl(cfg, prepared, str(out), str(out / "updates"))
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    assert all(r["sampled"] == 4 == r["replies"] for r in res["rounds"])  # 25% of 16
    assert res["final"]["round"] == 3 and 0.0 <= res["final"]["test_uar"] <= 1.0
    store = UpdateStore(out / "updates")
    assert len(store) == 12
    partitions = {r.partition for r in store.updates()}
    assert partitions <= set(range(16)) and len(partitions) > 1
    first = [(r.round, r.node) for r in store.updates()]

    # a longer run in the same folder resumes after round 3 and appends; results.json is gone, as
    # after a crash: the history comes back from the checkpoint (round 2's evaluation included)
    (out / "results.json").unlink()
    cfg.fl.rounds = 5
    res2 = run_fl(cfg, prepared, str(out), str(out / "updates"))
    assert [r["round"] for r in res2["rounds"]] == [1, 2, 3, 4, 5]
    assert "test_uar" in res2["rounds"][1] and res2["rounds"][1]["test_uar"] == res["rounds"][1]["test_uar"]
    store = UpdateStore(out / "updates")
    assert len(store) == 20
    assert [(r.round, r.node) for r in store.updates()][:12] == first
    assert json.loads((out / "results.json").read_text())["final"]["round"] == 5

    # Clients are selected by partition id with the shared schedule, so the vectorised shadow
    # engine records the same updates as Flower (interrupted and resumed) for the same seed.
    vec = tmp_path / "vectorised"
    run_vectorized_fl(cfg, prepared, str(vec), str(vec / "updates"))
    assert max_difference(store, UpdateStore(vec / "updates")) < 1e-5


def test_resume_refuses_a_folder_of_another_run(cfg_and_data, tmp_path):
    cfg, prepared = cfg_and_data
    out = tmp_path / "run"
    cfg.fl.rounds = 1
    run_fl(cfg, prepared, str(out))
    cfg.model.dropout = 0.4
    with pytest.raises(RuntimeError, match="different settings"):
        run_fl(cfg, prepared, str(out))


def test_simulation_attaches_to_a_running_ray_cluster(cfg_and_data, tmp_path):
    """`simulation.ray_address=...` runs the clients on an existing cluster (here a local head)."""
    import subprocess
    import sys
    from pathlib import Path

    from fed_ser.deployment.federation import free_port, wait_for_port

    cfg, prepared = cfg_and_data
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 120, head, "ray head")
        cfg.fl.rounds = 2
        cfg.simulation.ray_address = f"127.0.0.1:{port}"
        res = run_fl(cfg, prepared, str(tmp_path / "run"), str(tmp_path / "run" / "updates"))
        assert res["final"]["round"] == 2 and len(UpdateStore(tmp_path / "run" / "updates")) == 8
        assert head.poll() is None  # the cluster outlives the run (it was not started by it)
    finally:
        import os
        import signal

        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops the processes it started
        head.wait(60)
        # `ray start` leaves /tmp/ray/ray_current_cluster behind; simulate() starts its own local
        # Ray (address="local") so a stale file cannot redirect later runs, but do not leave it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
