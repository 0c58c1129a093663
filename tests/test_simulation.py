"""Short Flower simulations on Ray, through the same CLI path a user runs.

They attach to one Ray cluster started for this module (``simulation.ray_address``, as a user with a
cluster runs them): each run then connects to it instead of starting and stopping a local Ray of its
own. A run's own local Ray (the default) is what tests/test_threats.py and tests/test_audit.py run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fed_ser.data.federated import FederatedData
from fed_ser.deployment.federation import free_port, wait_for_port
from fed_ser.experiments.cli import load_config, run_fl, run_vectorized_fl, seconds_per_round
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.store import UpdateStore, max_difference


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head (``ray start --head``): its address, its session's log folder and its process."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 120, head, "ray head")
        yield f"127.0.0.1:{port}", temp / "session_latest" / "logs", head
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops the processes it started
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg_and_data(corpora, feature_cache, tmp_path_factory, ray_cluster):
    prepared_dir = tmp_path_factory.mktemp("prepared")
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={prepared_dir}", "dataset=iemocap", "shards.iemocap=2",
                       "fl.fraction=0.25", "fl.eval_every=2", "fl.rounds=3", f"simulation.ray_address={ray_cluster[0]}"])
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
    assert 0 < res["discover_seconds"] < res["wall_seconds"]  # the nodes' start is timed apart from the rounds
    assert seconds_per_round(res) == pytest.approx((res["wall_seconds"] - res["discover_seconds"]) / 3)
    store = UpdateStore(out / "updates")
    assert len(store) == 12
    partitions = {r.client for r in store.updates()}
    assert partitions <= set(range(16)) and len(partitions) > 1
    first = [(r.round, r.node) for r in store.updates()]

    # a longer run in the same folder resumes after round 3 and appends; results.json is gone, as
    # after a crash: the history comes back from the checkpoint (round 2's evaluation included)
    (out / "results.json").unlink()
    cfg.fl.rounds = 5
    res2 = run_fl(cfg, prepared, str(out), str(out / "updates"))
    assert [r["round"] for r in res2["rounds"]] == [1, 2, 3, 4, 5]
    assert res2["rounds_run"] == 2  # its seconds a round are over the two rounds it ran
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

    # a run of other settings refuses to resume that folder (the ServerApp's check: no recorder here, so no
    # check before the simulation starts), and leaves it as it was
    cfg.model.dropout = 0.4
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="different settings"):
        run_fl(cfg, prepared, str(out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    cfg.model.dropout = 0.2


def test_simulation_attaches_to_a_running_ray_cluster(cfg_and_data, ray_cluster, tmp_path):
    """`simulation.ray_address=...` runs the clients on an existing cluster (here a local head), which outlives the run."""
    cfg, prepared = cfg_and_data
    address, logs, head = ray_cluster
    drivers = lambda: {p.name for p in logs.glob(f"python-core-driver-*_{os.getpid()}.log")}
    before = drivers()
    cfg.fl.rounds = 2
    assert cfg.simulation.ray_address == address
    res = run_fl(cfg, prepared, str(tmp_path / "run"), str(tmp_path / "run" / "updates"))
    assert res["final"]["round"] == 2 and len(UpdateStore(tmp_path / "run" / "updates")) == 8
    assert len(drivers() - before) == 1  # this run's driver joined the cluster (a local Ray of its own logs elsewhere)
    assert head.poll() is None  # the cluster outlives the run (it was not started by it)


def one_actor(cfg) -> list[str]:
    """Overrides for a run on the module's cluster with one ClientApp actor (its 2 CPUs to one client): each run
    starts one actor instead of two. For the runs whose property is what a defence lets the server see; the
    FedSGD and cluster tests keep two actors, whose replies may arrive in any order."""
    return [f"simulation.ray_address={cfg.simulation.ray_address}", "simulation.cpus_per_client=2"]


def _gradients(store: UpdateStore, rnd: int) -> dict:
    return {u.client: store.attack_input(u) for u in store.updates() if u.round == rnd}


def test_flowers_dp_as_shipped_and_what_the_curious_server_still_records(cfg_and_data, tmp_path):
    """Each of Flower's DP modes runs in the simulation; the eavesdropper records what the server receives.

    Round 1 starts from the same global model and the same client batches in every run, so the
    server's record of it tells what each mechanism hides from the server: nothing under central DP
    (it clips and adds noise after receiving), the scale under client-side clipping (the direction
    survives: the feature-space inversion is scale-free), everything exact under local DP.
    """
    import numpy as np

    cfg, prepared = cfg_and_data
    one = one_actor(cfg)
    clip = 0.02
    runs = {}
    for mode in ("none", "central-fixed", "client-fixed", "local"):  # central-adaptive: tests/test_threats.py
        c = load_config([f"data.prepared_dir={cfg.data.prepared_dir}", "fl.fraction=0.25", "fl.rounds=1", "fl.eval_every=1",
                         f"flower_dp={mode.replace('-', '_')}", f"flower_dp.clip={clip}", *one])
        out = tmp_path / mode
        # without DP, the reference: the vectorised engine records what Flower does (the test above)
        res = (run_vectorized_fl if mode == "none" else run_fl)(c, prepared, str(out), str(out / "updates"))
        runs[mode] = (res, _gradients(UpdateStore(out / "updates"), 1))
    plain = runs["none"][1]
    assert len(plain) == 4 and "privacy" not in runs["none"][0]
    norm = lambda g: float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values())))
    assert min(norm(g) for g in plain.values()) * 0.1 > 5 * clip  # lr * |g| is well above the clip: clipping shows
    for mode in ("central-fixed",):  # the server sees every update before it clips
        rec = runs[mode][1]
        assert rec.keys() == plain.keys()
        for p, g in plain.items():
            for k in g:
                np.testing.assert_allclose(rec[p][k], g[k], rtol=1e-3, atol=2e-4)
        assert runs[mode][0]["privacy"]["epsilon_server"] is None
    for p, g in runs["client-fixed"][1].items():  # clipped to clip / lr, same direction
        assert abs(0.1 * norm(g) - clip) < 1e-3 * clip + 1e-5
        cos = sum(float((g[k].astype(np.float64) * plain[p][k]).sum()) for k in g) / (norm(g) * norm(plain[p]))
        assert cos > 0.999
    local = runs["local"]
    assert all(norm(g) > 10 * clip / 0.1 for g in local[1].values())  # the noise dominates a clipped update
    assert local[0]["privacy"]["epsilon_server"] == local[0]["privacy"]["spent_epsilon_max"] > 0


def test_secagg_plus_gives_the_server_only_sums_equal_to_the_weighted_mean_within_its_quantisation(cfg_and_data, tmp_path):
    """``fl.secagg=true flower_dp=client_fixed``: fed-ser's schedule through Flower's SecAgg+ (legacy workflow,
    as shipped) with client-side clipping inside ``secaggplus_mod``. The server records no update, only the
    global models and each round's unmasked mean reply; that mean equals the n_k-weighted mean of the
    clients' clipped one-step models up to SecAgg+'s quantisation of [-8, 8] into 2^22 steps (with Flower's
    default max_weight=1000 instead of the largest n_k the error was ~100x this bound's); the next global
    model carries Flower's central noise, std sigma C / m, on top of it."""
    import numpy as np

    from fed_ser.core.model import build_model
    from fed_ser.core.schedule import client_seed, select_clients
    from fed_ser.data.federated import TRAIN
    from fed_ser.experiments.cli import run_settings
    from fed_ser.flower.secagg import quantisation_bound
    from fed_ser.run.client import client_update

    cfg, prepared = cfg_and_data
    one = one_actor(cfg)
    clip = 0.05
    cfg = load_config([f"data.prepared_dir={cfg.data.prepared_dir}", "fl.fraction=0.25", "fl.rounds=2", "fl.eval_every=2",
                       "fl.secagg=true", "flower_dp=client_fixed", f"flower_dp.clip={clip}", *one])
    out = tmp_path / "secagg"
    res = run_fl(cfg, prepared, str(out), str(out / "updates"))
    s = run_settings(cfg, prepared, str(out))
    data = FederatedData.load(prepared)
    chosen = select_clients(s.seed, 1, data.num_clients, s.fraction)
    assert [r["clients"] for r in res["rounds"]] == [chosen, select_clients(s.seed, 2, data.num_clients, s.fraction)]
    assert res["privacy"]["mode"] == "flower:client-fixed" and res["privacy"]["epsilon_server"] is None
    store = UpdateStore(out / "updates")
    assert store.updates() == []  # the server never held one client's update
    theta = store.read(store.global_record(1))
    got, noisy = store.read(store.aggregate_record(1)), store.read(store.global_record(2))
    models, weights, factors = [], [], []
    for client in chosen:
        X, y = data.client_rows(client, TRAIN)
        r = client_update(build_model(data.X.shape[1], s.dropout, s.seed), X, y, s, client_seed(s.seed, 1, client),
                          client=client, num_clients=data.num_clients)
        step = {k: -s.lr * r.arrays[k] for k in theta}
        factors.append(min(1.0, clip / float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in step.values())))))
        models.append({k: theta[k] + factors[-1] * step[k] for k in theta})
        weights.append(r.num_examples)
    assert min(factors) < 1  # the clipping acted
    w = np.array(weights, float) / sum(weights)
    bound = quantisation_bound(weights, max(len(data.client_rows(p, TRAIN)[1]) for p in range(data.num_clients)))
    worst = max(float(np.abs(got[k] - sum(wi * m[k] for wi, m in zip(w, models))).max()) for k in theta)
    assert 0 < worst <= bound  # quantised: not bit-equal, so the comparison is not with itself
    noise = np.concatenate([(noisy[k] - got[k]).ravel() for k in theta])
    assert np.std(noise) == pytest.approx(s.flower_dp_noise * clip / len(chosen), rel=0.05)
