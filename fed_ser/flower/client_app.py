"""Flower ClientApp: one speaker shard per node.

The shard comes from the node's ``partition-id`` (simulation assigns it; a real SuperNode is
given it with ``--node-config 'partition-id=3 num-partitions=10'``). A reply carries the update,
``num-examples`` (n_k), the local step count and the ``client-id`` (the partition id: a pseudonymous client index,
like the node id); never the speaker id or gender.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fed_ser.core.metrics import evaluate
from fed_ser.core.model import build_model
from fed_ser.core.schedule import client_seed, federation_size
from fed_ser.core.training import LocalResult, local_update
from fed_ser.data.federated import TRAIN, VAL, FederatedData
from fed_ser.flower.eavesdropper import arrays_to_numpy, numpy_to_arrays
from fed_ser.flower.privacy import client_mods
from fed_ser.run.client import client_update
from fed_ser.run.settings import RunSettings

if TYPE_CHECKING:
    from fed_ser.flower.canary import CanaryClients


@lru_cache(maxsize=4)
def _data(path: str) -> FederatedData:
    return FederatedData.load(path)


@lru_cache(maxsize=4)
def _parameter_names(input_dim: int) -> list[str]:
    """The model's parameter names in order (legacy messages carry the arrays without them)."""
    return list(build_model(input_dim, 0.0, 0).state_dict())


def client_id(context: Context) -> int:
    """This node's client id: the data shard Flower's node config names ``partition-id``."""
    if "partition-id" not in context.node_config:
        raise KeyError("node config lacks 'partition-id' (start the SuperNode with --node-config 'partition-id=K')")
    return int(context.node_config["partition-id"])


def _model(s: RunSettings, data: FederatedData, msg: Message) -> torch.nn.Module:
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


def one_step_model(theta: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
    """``theta - lr g`` in float32, never exactly ``theta``: where the step vanishes in float32 (a saturated
    model's gradient, e.g. after heavy central DP noise), one entry moves by one ulp, because Flower
    1.41's clipping divides by the update's norm and stops the run on a zero update."""
    out = {k: (theta[k] - lr * g).astype(np.float32) for k, g in grads.items()}
    if all(np.array_equal(out[k], theta[k]) for k in out):
        k = next(iter(out))
        flat = out[k].reshape(-1)
        flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    return out


def local_round(s: RunSettings, context: Context, theta: dict[str, np.ndarray], rnd: int,
                canaries: CanaryClients | None = None) -> tuple[LocalResult, int]:
    """One client's local round from the global model ``theta``: FedSGD gradient of one batch, or FedAvg
    local epochs; FedSGD under :attr:`~fed_ser.run.settings.RunSettings.model_replies` replies with the
    one-step model. Returns the result and the client id. A client of ``canaries`` (a privacy audit's,
    :mod:`fed_ser.flower.canary`) sends its canary update in place of training, through the same defences."""
    torch.set_num_threads(1)
    data = _data(s.prepared)
    client = client_id(context)
    X, y = data.client_rows(client, TRAIN)
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
    local = canaries.local(client) if canaries is not None and canaries.holds(client) else local_update
    result = client_update(model, X, y, s, client_seed(s.seed, rnd, client), client=client,
                           num_clients=federation_size(s.min_available, data.num_clients), local=local)
    if s.algorithm == "fedsgd" and s.model_replies:  # the one-step model, for Flower's DP and SecAgg+
        result.arrays = one_step_model(theta, result.arrays, s.lr)
    return result, client


def handle_train(msg: Message, context: Context, s: RunSettings, canaries: CanaryClients | None = None) -> Message:
    """A training message (Message API): the local round, replied with its metrics."""
    theta = arrays_to_numpy(msg.content.array_records["arrays"])
    result, client = local_round(s, context, theta, int(msg.content.config_records["config"]["server-round"]), canaries)
    metrics = MetricRecord({"num-examples": result.num_examples, "local-steps": result.steps,
                            "train-loss": result.loss, "client-id": client, **result.metrics})
    return Message(RecordDict({"arrays": numpy_to_arrays(result.arrays), "metrics": metrics}), reply_to=msg)


def handle_train_legacy(msg: Message, context: Context, s: RunSettings, canaries: CanaryClients | None = None) -> Message:
    """A training message in Flower's legacy format, as ``secaggplus_mod`` passes it on under SecAgg+
    (:mod:`fed_ser.flower.secagg`): the same local round, replied as a ``FitRes``."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = _parameter_names(_data(s.prepared).X.shape[1])
    theta = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
    result, client = local_round(s, context, theta, int(fitins.config["server-round"]), canaries)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([result.arrays[k] for k in keys]), result.num_examples,
                    {"client-id": client})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, s: RunSettings) -> Message:
    """Accuracy and UAR of the global model on the client's validation rows."""
    torch.set_num_threads(1)
    data = _data(s.prepared)
    X, y = data.client_rows(client_id(context), VAL)
    m = evaluate(_model(s, data, msg), X, y)
    metrics = MetricRecord({"num-examples": len(y), "val-acc": m["acc"], "val-uar": m["uar"], "val-loss": m["loss"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server which client (data shard) this node holds (a pseudonymous index, as in the replies).

    The server asks once before round 1, so that it can select clients by client id with the
    shared seeded schedule (:func:`fed_ser.core.schedule.select_clients`) instead of by Flower's
    random node ids: the same seed then trains the same clients in every run and engine.
    """
    return Message(RecordDict({"metrics": MetricRecord({"client-id": client_id(context)})}), reply_to=msg)


def make_client_app(settings: RunSettings | None = None, canaries: CanaryClients | None = None) -> ClientApp:
    """A ClientApp using ``settings`` (Hydra CLI) or, if None, the run config (``flwr run``); ``canaries``: the
    clients that send a privacy audit's canary updates (:mod:`fed_ser.flower.canary`), none in a normal run."""
    def _settings(context: Context) -> RunSettings:
        return settings if settings is not None else RunSettings.from_run_config(context.run_config)

    def privacy_mod(msg: Message, context: Context, call_next):
        """The run's privacy mods around a training message (the run config is known per message):
        ``secaggplus_mod`` outermost under ``fl.secagg`` (then the message is in the legacy format), inside
        it Flower's client-side DP mods of ``flower_dp.mode``. Training messages only: Flower 1.41's
        ``LocalDpMod`` does not check the message type and answers an evaluate or query message with an error."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        s = _settings(context)
        mods = client_mods(s)
        if s.secagg:
            mods = [secaggplus_mod, *mods]
            call_next = (lambda m, c: handle_train_legacy(m, c, s, canaries))
        for mod in reversed(mods):
            call_next = (lambda m, c, mod=mod, nxt=call_next: mod(m, c, nxt))
        return call_next(msg, context)

    client_app = ClientApp(mods=[privacy_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, _settings(context), canaries)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, _settings(context))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return client_app


app = make_client_app()
