"""SecAgg+ as Flower 1.41 ships it: the server learns each round's weighted sum, never one update.

Flower 1.41 offers SecAgg+ only in its legacy workflow API: ``SecAggPlusWorkflow`` run by a
``DefaultWorkflow`` over a ``LegacyContext`` and a legacy strategy, ``secaggplus_mod`` on the
ClientApp. ``fl.secagg=true`` puts fed-ser's run there without changing what is trained: the
ServerApp (:func:`fed_ser.flower.server_app.run_federated`) hands its rounds to :func:`run_secagg`,
whose legacy strategy (:class:`ScheduledSecAgg`) selects the round's clients with fed-ser's seeded
schedule, as :class:`~fed_ser.flower.strategy.FedSerStrategy` does; the ClientApp runs the same
local round behind ``secaggplus_mod`` (:func:`fed_ser.flower.client_app.handle_train_legacy`) and
replies with the model (FedSGD: the one-step model ``theta - lr g``, whose weighted mean is FedSGD's
server step).

What the server records is what SecAgg+ leaves it: the global model of every round, the round's
unmasked sum (store records of kind ``aggregate``) and who took part (the round's row in
``results.json``, from the replies' metrics, which Flower's SecAgg+ passes in the clear), never an update; :mod:`attacks.inference.aggregate`
reads that view. Central DP composes with it the one way it can: client-side clipping
(``flower_dp.mode=client_fixed``: Flower's legacy ``DifferentialPrivacyClientSideFixedClipping``
adds the noise to the sum, ``fixedclipping_mod`` clips inside ``secaggplus_mod``), or local DP
(``LocalDpMod`` inside ``secaggplus_mod``); server-side clipping needs the updates and is refused.

Each client sends ``n_k / max_weight`` times its parameters, quantised over ``[-8, 8]`` in ``2^22``
steps; Flower's default ``max_weight`` of 1000 against a few dozen utterances a client multiplies
the quantisation error of the mean by ``1000 / sum n_k`` (benchmarks/README.md: how large against
first-layer weights), so fed-ser sets it to the largest client's sample count.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fed_ser.core.schedule import clients_per_round, is_eval_round, select_clients
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.run.settings import RunSettings

#: Share of a round's clients whose shares must survive to unmask the sum (Flower's example value).
RECONSTRUCTION_THRESHOLD = 0.7


class ScheduledSecAgg(FedAvg):
    """Flower's legacy FedAvg (a sample-weighted mean: the sum SecAgg+ unmasks, over its total weight),
    with fed-ser's client schedule. Per round it keeps what the server learns (``rounds[rnd]``: the
    clients that took part) and, with a ``recorder``, records all of it: the global model the round
    starts from and the round's unmasked mean reply (before the noise of a central-DP wrapper around
    this strategy). ``on_round(rnd, params)`` gets each round's new global model (Flower's centralised
    evaluation). Rounds are numbered from ``round_offset + 1`` (a resumed run)."""

    def __init__(self, s: RunSettings, num_clients: int, client_nodes: dict[int, int], initial: dict[str, np.ndarray],
                 on_round: Callable[[int, dict[str, np.ndarray]], None], recorder: UpdateRecorder | None = None,
                 round_offset: int = 0) -> None:
        self.keys = list(initial)

        def evaluate_fn(server_round: int, ndarrays: list[np.ndarray], config: dict):
            if server_round > 0:
                on_round(server_round + round_offset, dict(zip(self.keys, ndarrays)))
            return None

        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=1,
                         min_available_clients=1, initial_parameters=ndarrays_to_parameters(list(initial.values())),
                         evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=lambda _: {})
        self.s, self.num_clients, self.client_nodes = s, num_clients, client_nodes
        self.recorder, self.round_offset = recorder, round_offset
        self.rounds: dict[int, dict] = {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.record_global(rnd, dict(zip(self.keys, parameters_to_ndarrays(parameters))))
        proxies = client_manager.all()
        chosen = select_clients(self.s.seed, rnd, self.num_clients, self.s.fraction)
        online = [p for p in chosen if str(self.client_nodes.get(p)) in proxies]
        self.rounds[rnd] = {"round": rnd, "sampled": len(chosen), "clients": online}
        ins = FitIns(parameters, {"server-round": rnd})
        return [(proxies[str(self.client_nodes[p])], ins) for p in online]

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        rnd = server_round + self.round_offset
        row = self.rounds.setdefault(rnd, {"round": rnd, "sampled": len(results), "clients": []})
        row.update(replies=len(results) if params is not None else 0, train_loss=None)
        ids = [res.metrics.get("client-id") for _, res in results]
        if params is not None and all(i is not None for i in ids):  # who is in the sum (Flower's SecAgg+ sends metrics in the clear)
            row["clients"] = sorted(int(i) for i in ids)
        if self.recorder is not None:
            if params is not None:
                total = int(sum(res.num_examples for _, res in results))
                self.recorder.record_aggregate(rnd, dict(zip(self.keys, parameters_to_ndarrays(params))), total)
            self.recorder.commit()
        return params, metrics

    def is_eval_round(self, rnd: int) -> bool:
        return is_eval_round(rnd, self.s.eval_every, self.s.rounds)


def quantisation_bound(num_examples: list[int], max_weight: float, clipping_range: float = 8.0,
                       quantization_range: int = 2**22) -> float:
    """The largest error SecAgg+'s quantisation can put on one entry of the weighted mean: each client's
    stochastically rounded ``(n_k / max_weight) theta_k`` is off by less than one step, the sum by
    ``K`` steps, divided by ``sum n_k / max_weight``."""
    step = 2 * clipping_range / (quantization_range - 1)
    return len(num_examples) * step / (sum(num_examples) / max_weight)


def run_secagg(grid: Grid, context: Context, s: RunSettings, strategy: ScheduledSecAgg, rounds: int,
               max_weight: float) -> None:
    """``rounds`` rounds of ``strategy`` under SecAgg+ (``max_weight``: the largest client's sample count),
    inside Flower's client-side-clipping DP wrapper under ``flower_dp.mode=client_fixed``."""
    per_round = clients_per_round(strategy.num_clients, s.fraction)
    if per_round < 3:
        raise ValueError(f"fl.secagg=true needs at least 3 clients a round; fl.fraction={s.fraction} of "
                         f"{strategy.num_clients} clients gives {per_round}")
    server = strategy
    if s.flower_dp_mode == "client-fixed":  # the noise goes on the unmasked sum; clipping is on the clients
        server = DifferentialPrivacyClientSideFixedClipping(strategy, s.flower_dp_noise, s.flower_dp_clip, per_round)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds, round_timeout=s.round_timeout),
                           strategy=server)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                                  max_weight=max_weight, timeout=s.round_timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
