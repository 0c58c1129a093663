"""FedSGD/FedAvg arithmetic and the recorder, tested with mocked Flower replies (no simulation)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fed_ser.core.model import build_model
from fed_ser.core.training import local_update
from fed_ser.flower.eavesdropper import Eavesdropper, arrays_to_numpy, numpy_to_arrays
from fed_ser.flower.strategy import FedSerStrategy
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply(to: Message, arrays: dict, n: int, client: int, steps: int = 1) -> Message:
    metrics = MetricRecord({"num-examples": n, "client-id": client, "local-steps": steps, "train-loss": 1.0})
    return Message(RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": metrics}), reply_to=to)


THETA = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([0.5, -0.5], dtype=np.float32)}


def _round(strategy, rnd, grid, updates):
    msgs = list(strategy.configure_train(rnd, numpy_to_arrays(THETA), ConfigRecord({}), grid))
    replies = [_reply(m, updates[i][0], updates[i][1], i) for i, m in enumerate(msgs)]
    agg, _ = strategy.aggregate_train(rnd, replies)
    return arrays_to_numpy(agg), msgs


def test_fedsgd_server_step_matches_hand_computation(tmp_path):
    g1 = {"w": np.ones((2, 2), np.float32), "b": np.array([1.0, 2.0], np.float32)}
    g2 = {"w": np.full((2, 2), 4.0, np.float32), "b": np.array([-2.0, 0.0], np.float32)}
    s = FedSerStrategy(algorithm="fedsgd", lr=0.1, fraction_train=1.0, min_available_nodes=2, min_train_nodes=2)
    new, _ = _round(s, 1, FakeGrid([11, 22]), [(g1, 10), (g2, 30)])
    # theta - lr * (10/40 g1 + 30/40 g2)
    np.testing.assert_allclose(new["w"], THETA["w"] - 0.1 * (0.25 * 1 + 0.75 * 4), rtol=1e-6)
    np.testing.assert_allclose(new["b"], THETA["b"] - 0.1 * np.array([0.25 * 1 - 0.75 * 2, 0.25 * 2]), rtol=1e-6)


def test_fedavg_is_sample_weighted_mean_of_client_parameters():
    t1 = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    t2 = {"w": np.full((2, 2), 8.0, np.float32), "b": np.full(2, 4.0, np.float32)}
    s = FedSerStrategy(algorithm="fedavg", lr=5e-4, fraction_train=1.0, min_available_nodes=2, min_train_nodes=2)
    new, _ = _round(s, 1, FakeGrid([1, 2]), [(t1, 30), (t2, 10)])
    np.testing.assert_allclose(new["w"], np.full((2, 2), 2.0))
    np.testing.assert_allclose(new["b"], np.full(2, 1.0))


def test_recorder_holds_selected_clients_times_rounds(tmp_path):
    store = UpdateStore(tmp_path / "u", mode="a")
    nodes = list(range(100, 120))
    s = Eavesdropper(FedSerStrategy(algorithm="fedsgd", lr=0.1, fraction_train=0.1, min_available_nodes=20, min_train_nodes=1),
                     UpdateRecorder(store, "fedsgd", 0.1, layers=["w"]))
    seen = []
    for rnd in range(1, 6):
        _, msgs = _round(s, rnd, FakeGrid(nodes), [(THETA, 5)] * 2)
        seen += [(rnd, m.metadata.dst_node_id) for m in msgs]
    assert len(seen) == 10  # 10% of 20 clients, 5 rounds
    assert [(r.round, r.node) for r in store.updates()] == seen
    assert all(list(r.layers) == ["w"] for r in store.updates())  # only the chosen layer


def test_fedavg_pseudo_gradient_equals_true_gradient_for_one_sgd_step(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 4, 20)
    model = build_model(6, 0.0, seed=1)
    theta = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    grad = local_update(build_model(6, 0.0, seed=1), X, y, algorithm="fedsgd", batch_size=20).arrays
    local = local_update(model, X, y, algorithm="fedavg", batch_size=20, lr=0.01, epochs=1, optimizer="sgd")
    assert local.steps == 1
    store = UpdateStore(tmp_path / "u", mode="a")
    rec = Eavesdropper(FedSerStrategy(algorithm="fedavg", lr=0.01), UpdateRecorder(store, "fedavg", lr=0.01))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    q = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
    rec.record(1, _reply(q, local.arrays, 20, 0, steps=local.steps), theta)
    (info,) = store.updates()
    pseudo = store.attack_input(info)
    for k in grad:
        # float32 parameters resolve ~1e-8; divided by lr=0.01 that is ~1e-6 of absolute error
        np.testing.assert_allclose(pseudo[k], grad[k], rtol=1e-3, atol=5e-6)
    glob = store.read(store.global_record(1))
    np.testing.assert_allclose(glob["dense1.weight"] - store.read(info)["dense1.weight"], local.arrays["dense1.weight"], atol=1e-6)


def test_selection_by_client_id_follows_the_shared_schedule_and_skips_gone_nodes():
    from fed_ser.core.schedule import select_clients

    nodes = {client: 1000 + 17 * client for client in range(20)}  # client -> node id
    strat = FedSerStrategy(algorithm="fedsgd", lr=0.1, client_nodes=nodes, num_clients=20, seed=4,
                           fraction_train=0.25, min_available_nodes=1)
    arrays = numpy_to_arrays({"w": np.zeros(2, dtype=np.float32)})
    for rnd in (1, 2):
        msgs = strat.configure_train(rnd, arrays, ConfigRecord({}), FakeGrid(nodes.values()))
        assert sorted(m.metadata.dst_node_id for m in msgs) == [nodes[p] for p in select_clients(4, rnd, 20, 0.25)]
        assert all(m.content.config_records["config"]["server-round"] == rnd for m in msgs)
    chosen = select_clients(4, 3, 20, 0.25)
    online = [n for p, n in nodes.items() if p != chosen[0]]  # one selected node has gone away
    msgs = strat.configure_train(3, arrays, ConfigRecord({}), FakeGrid(online))
    assert len(msgs) == len(chosen) - 1 and strat.rounds[3]["sampled"] == len(chosen)


def test_a_reply_without_a_required_metric_is_an_error_naming_the_node(tmp_path):
    """A silent default (local-steps=1) would scale a FedAvg pseudo-gradient wrongly by T."""
    s = Eavesdropper(FedSerStrategy(algorithm="fedavg", lr=5e-4, fraction_train=1.0, min_available_nodes=2, min_train_nodes=2),
                     UpdateRecorder(UpdateStore(tmp_path / "u", mode="a"), "fedavg", 5e-4))
    msgs = list(s.configure_train(1, numpy_to_arrays(THETA), ConfigRecord({}), FakeGrid([11, 22])))
    good = _reply(msgs[0], THETA, 10, 0)
    bad = Message(RecordDict({"arrays": numpy_to_arrays(THETA),
                              "metrics": MetricRecord({"num-examples": 10, "client-id": 1})}), reply_to=msgs[1])
    node = msgs[1].metadata.dst_node_id
    with pytest.raises(ValueError, match=rf"reply of node {node} lacks the metric\(s\) \['local-steps'\]"):
        s.aggregate_train(1, [good, bad])


def test_a_federation_smaller_than_the_data_set_stops_naming_both_numbers():
    """flwr run's default local federation has 2 nodes: the ServerApp must not wait for 72 for ever."""
    import time

    from fed_ser.flower.server_app import FederationTooSmall, discover_clients

    t0 = time.monotonic()
    with pytest.raises(FederationTooSmall, match=r"has 2 node\(s\) but x\.npz has 72 clients.*num-supernodes=72"):
        discover_clients(FakeGrid([1, 2]), 72, "x.npz", settle=1.0)
    assert time.monotonic() - t0 < 10


def test_the_core_aggregation_is_flower_s_weighted_average_bit_for_bit():
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fed_ser.core.aggregation import weighted_mean

    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32)} for _ in range(7)]
    n = [13, 7, 21, 9, 9, 30, 2]
    records = [RecordDict({"arrays": numpy_to_arrays(u), "metrics": MetricRecord({"num-examples": k})}) for u, k in zip(updates, n)]
    flower = arrays_to_numpy(aggregate_arrayrecords(records, "num-examples"))
    ours = weighted_mean(updates, n)
    for k in flower:
        assert ours[k].dtype == np.float32 and np.array_equal(ours[k], flower[k]), k
    float64 = {k: sum(np.float64(w) / sum(n) * u[k] for w, u in zip(n, updates)) for k in flower}
    assert any(not np.array_equal(ours[k], float64[k].astype(np.float32)) for k in flower)  # the order of operations shows


def test_the_strategy_moves_the_global_model_as_flower_s_fedavg_does_bit_for_bit():
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(1)
    theta = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    models = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in theta.items()} for _ in range(5)]
    n = [17, 3, 40, 8, 8]
    ours = FedSerStrategy(algorithm="fedavg", lr=5e-4, fraction_train=1.0, min_available_nodes=5, min_train_nodes=5)
    msgs = list(ours.configure_train(1, numpy_to_arrays(theta), ConfigRecord({}), FakeGrid(range(1, 6))))
    replies = [_reply(m, models[i], n[i], i) for i, m in enumerate(msgs)]
    agg, _ = ours.aggregate_train(1, replies)
    flower, _ = FedAvg(fraction_train=1.0, min_available_nodes=5, min_train_nodes=5).aggregate_train(1, replies)
    for k in theta:
        assert np.array_equal(arrays_to_numpy(agg)[k], arrays_to_numpy(flower)[k]), k
    wrong = [_reply(msgs[0], {"w": models[0]["w"]}, 10, 0)]  # a reply without the bias
    with pytest.raises(ValueError, match="holds arrays"):
        ours.aggregate_train(1, wrong)


def test_under_central_dp_every_reply_weighs_the_same():
    """Flower's central DP noise is calibrated for the unweighted mean of the clipped replies: with FedAvg's
    example weights a client of many examples would move the mean by more than C/m (fed-ser-audit's
    example-weighted row). With uniform weights, as the server app sets them under a central DP wrapper,
    the wrapped round moves the model by the plain mean of the (clipped) replies."""
    from fed_ser.flower.privacy import CENTRAL_DP_MODES, wrap_strategy
    from fed_ser.run.settings import RunSettings

    t1 = {"w": THETA["w"] + 1.0, "b": THETA["b"]}
    t2 = {"w": THETA["w"] + 4.0, "b": THETA["b"]}
    settings = RunSettings(prepared="x.npz", algorithm="fedavg", flower_dp_mode="central-fixed", flower_dp_noise=1e-9,
                           flower_dp_clip=100.0)
    moved = {}
    for uniform in (False, True):
        inner = FedSerStrategy(algorithm="fedavg", lr=5e-4, uniform_weights=uniform, fraction_train=1.0,
                               min_available_nodes=2, min_train_nodes=2)
        new, _ = _round(wrap_strategy(inner, settings, 2), 1, FakeGrid([1, 2]), [(t1, 10), (t2, 40)])
        moved[uniform] = float((new["w"] - THETA["w"]).mean())
    assert moved[True] == pytest.approx(2.5, abs=1e-4) and moved[False] == pytest.approx((10 + 160) / 50, abs=1e-4)
    assert "central-fixed" in CENTRAL_DP_MODES and "local" not in CENTRAL_DP_MODES
