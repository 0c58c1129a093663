"""The vectorised engine reproduces the per-client loop: same clients, batches, dropout masks and
arithmetic, so shadow updates do not depend on which engine produced them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_ser.core.model import build_model
from fed_ser.core.training import dropout_multiplier, local_plan, local_update, seed_client_rng
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.engines.inprocess import run_inprocess
from fed_ser.engines.vectorized import client_work, fedavg_round, run_vectorized
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.recording.store import max_difference as max_store_difference
from fed_ser.run.settings import RunSettings


@pytest.fixture(scope="module")
def data_path(corpora, feature_cache, tmp_path_factory):
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}", "shards.msp_improv=2"])
    return prepare(cfg, ["msp_improv"], fold=0)


def test_dropout_multiplier_is_the_mask_nn_dropout_draws():
    x = torch.ones(20, 256)
    seed_client_rng(7)
    expected = torch.nn.Dropout(0.4).train()(x)
    seed_client_rng(7)
    assert torch.equal(dropout_multiplier(20, 256, 0.4), expected)
    assert dropout_multiplier(20, 256, 0.0) is None


def test_a_forward_pass_given_the_plan_mask_is_the_dropout_module_s():
    model = build_model(12, 0.4, seed=0).train()
    x = torch.randn(7, 12)
    (step,) = local_plan(7, algorithm="fedsgd", batch_size=20, epochs=1, seed=5, hidden=256, dropout=0.4)
    seed_client_rng(5)
    assert torch.equal(model(x, step.keep), model(x))  # the module draws the same mask after the same seed
    assert not torch.equal(model(x, step.keep), model.eval()(x))


def test_the_plan_of_fedavg_covers_every_row_once_an_epoch():
    plan = local_plan(45, algorithm="fedavg", batch_size=20, epochs=2, seed=1, hidden=8, dropout=0.0)
    assert [len(s.rows) for s in plan] == [20, 20, 5, 20, 20, 5] and all(s.keep is None for s in plan)
    for epoch in (plan[:3], plan[3:]):
        assert sorted(np.concatenate([s.rows for s in epoch])) == list(range(45))


def test_fedsgd_run_equals_the_per_client_loop(data_path, tmp_path):
    data = FederatedData.load(data_path)
    assert min(len(data.client_rows(p, TRAIN)[0]) for p in range(data.num_clients)) < 20  # padding is exercised
    s = RunSettings(prepared=str(data_path), algorithm="fedsgd", rounds=6, fraction=0.3, lr=0.1, dropout=0.4)
    a = UpdateRecorder(UpdateStore(tmp_path / "loop", mode="a"), "fedsgd", 0.1)
    b = UpdateRecorder(UpdateStore(tmp_path / "vec", mode="a"), "fedsgd", 0.1)
    ref = run_inprocess(data, s, a)
    res = run_vectorized(data, s, b, progress=False)
    assert len(b.store) == 6 * int(0.3 * data.num_clients)
    assert max_store_difference(a.store, b.store) < 1e-5
    assert res["final"]["test_uar"] == pytest.approx(ref["uar"], abs=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedavg_round_equals_local_update(data_path, optimizer):
    data = FederatedData.load(data_path)
    s = RunSettings(prepared=str(data_path), algorithm="fedavg", lr=5e-4, local_epochs=2, optimizer=optimizer,
                    dropout=0.2, batch_size=2)
    model = build_model(data.X.shape[1], s.dropout, seed=1)
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes = {p: len(data.client_rows(p, TRAIN)[0]) for p in range(data.num_clients)}
    clients = sorted(sizes, key=sizes.get)[:: max(data.num_clients // 4, 1)][:4]
    work = [client_work(*data.client_rows(p, TRAIN), s, 100 + p, model) for p in clients]
    assert len({len(c.steps) for c in work}) > 1  # clients with different step counts finish at different steps
    stacked, _ = fedavg_round(model, theta, work, s.batch_size, s.lr, optimizer)
    for i, client in enumerate(clients):
        model.load_state_dict(theta)
        r = local_update(model, *data.client_rows(client, TRAIN), algorithm="fedavg", lr=s.lr, epochs=2,
                         batch_size=2, optimizer=optimizer, seed=100 + client)
        assert r.steps == len(work[i].steps)
        for k, v in r.arrays.items():
            np.testing.assert_allclose(stacked[k][i].numpy(), v, rtol=0, atol=1e-5, err_msg=f"{optimizer} {client} {k}")
