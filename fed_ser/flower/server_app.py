"""Flower ServerApp: FedSGD/FedAvg with the eavesdropping recorder and global evaluation.

Results land in ``out_dir``: ``results.json`` (per-round metrics, final and model-selected test
Acc/UAR, replies per round), ``checkpoint.npz`` (global model after the last finished round, so a
restarted run resumes there and the recorder appends after the last complete round).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_ser.core.metrics import evaluate
from fed_ser.core.model import build_model
from fed_ser.core.schedule import clients_per_round, federation_size
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.flower.eavesdropper import Eavesdropper, arrays_to_numpy, numpy_to_arrays
from fed_ser.flower.grid import PromptGrid
from fed_ser.flower.privacy import CENTRAL_DP_MODES, wrap_strategy
from fed_ser.flower.secagg import ScheduledSecAgg, run_secagg
from fed_ser.flower.strategy import FedSerStrategy
from fed_ser.io import atomic_write_json
from fed_ser.recording.checkpoint import NAME as CHECKPOINT
from fed_ser.recording.checkpoint import checkpoint_history, load_checkpoint, save_checkpoint
from fed_ser.recording.overwrite import check_overwrite
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.run.privacy import check_privacy, privacy_report
from fed_ser.run.settings import RunSettings


class FederationTooSmall(RuntimeError):
    """The federation holds fewer nodes than the data set has clients; the message says how to fix it."""


def discover_clients(grid: Grid, expected: int, prepared: str = "", timeout: float = 600.0,
                     settle: float = 30.0) -> dict[int, int]:
    """Wait for ``expected`` nodes, ask each which client (data shard) it holds; return client id -> node id.

    If fewer nodes are there and their number has not changed for ``settle`` seconds (a simulation
    whose node count is fixed, say), the run stops with a message naming both numbers and how to
    set the federation's size, instead of waiting for ever. Nodes that do not answer within
    ``timeout`` are left out (they will not be selected). Two nodes claiming one client is a
    deployment error and stops the run.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    print(f"[fed-ser] waiting for {expected} nodes", flush=True)
    seen, since = -1, t0
    while len(node_ids := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if len(node_ids) != seen:
            seen, since = len(node_ids), now
        if now - since > settle or now > deadline:
            raise FederationTooSmall(
                f"the federation has {len(node_ids)} node(s) but {prepared or 'the data set'} has {expected} clients "
                f"(one per node). Simulate as many: `flwr run . --federation-config \"num-supernodes={expected}\"`, "
                f"or federate the first {len(node_ids)} clients only: --run-config fl.min_available={len(node_ids)}")
        time.sleep(0.5)
    queries = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            print(f"[fed-ser] node {reply.metadata.src_node_id} did not say its client id: {reply.error.reason}", flush=True)
            continue
        client = int(reply.content.metric_records["metrics"]["client-id"])
        if client in found:
            raise RuntimeError(f"nodes {found[client]} and {reply.metadata.src_node_id} both hold client {client} (partition-id={client})")
        found[client] = reply.metadata.src_node_id
    print(f"[fed-ser] {len(node_ids)} nodes connected, {len(found)} hold clients {sorted(found)} "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    return found


def _resume(s: RunSettings, model) -> tuple[int, list[dict]]:
    """The round a run starts after and its history so far (a finished round's checkpoint under ``resume``)."""
    ckpt = Path(s.out_dir) / CHECKPOINT if s.out_dir else None
    if not (s.resume and ckpt is not None and ckpt.exists()):
        return 0, []
    start_round, params = load_checkpoint(ckpt, s)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return start_round, [r for r in checkpoint_history(ckpt) if r["round"] <= start_round]


def _recorder(s: RunSettings, start_round: int) -> UpdateRecorder | None:
    """The eavesdropper's recorder, its store cut back to the last finished round."""
    if not s.recorder_dir:
        return None
    check_overwrite(s, start_round)  # records of finished rounds are dropped only under recorder.overwrite=true
    store = UpdateStore(s.recorder_dir, mode="a")
    dropped = store.truncate_after_round(start_round)
    if dropped:
        print(f"[fed-ser] resumed at round {start_round}: dropped {dropped} recorded updates of unfinished rounds")
    return UpdateRecorder(store, s.algorithm, s.lr, s.layers(), s.recorder_float16, model_replies=s.model_replies)


class _RoundLog:
    """Flower's ``evaluate_fn``: after every round, the round's row in the history, the held-out speakers'
    evaluation on evaluation rounds (with per-speaker counts for the UAR's interval), and the checkpoint."""

    def __init__(self, s: RunSettings, data: FederatedData, start_round: int, history: list[dict]):
        self.s, self.start_round, self.history = s, start_round, history
        self.X, self.y = data.test_rows()
        self.speakers = data.test_speakers()
        self.model = build_model(data.X.shape[1], s.dropout, s.seed)
        self.ckpt = Path(s.out_dir) / CHECKPOINT if s.out_dir else None
        self.strategy = None  # set once built: its per-round bookkeeping
        self.t0 = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = server_round + self.start_round
        row = {"sampled": 0, "replies": 0, "train_loss": None, **self.strategy.rounds.get(rnd, {"round": rnd})}
        line = f"[fed-ser] round {rnd}/{self.s.rounds}: {row['replies']}/{row['sampled']} replies"
        metrics = None
        if self.strategy.is_eval_round(rnd):
            self.model.load_state_dict(arrays.to_torch_state_dict())
            m = evaluate(self.model, self.X, self.y, self.speakers)
            row.update(test_acc=m["acc"], test_uar=m["uar"], test_counts=m.get("counts"))
            line += f", test acc {m['acc']:.3f} UAR {m['uar']:.3f}"
            metrics = MetricRecord({"test-acc": m["acc"], "test-uar": m["uar"]})
        if rnd == 1 or "test_uar" in row or row["replies"] < row["sampled"]:  # started / progress / a node lost
            print(f"{line} ({time.perf_counter() - self.t0:.1f} s)", flush=True)
        self.history.append(row)
        if self.ckpt is not None:
            save_checkpoint(self.ckpt, rnd, self.s, arrays_to_numpy(arrays), self.history)
        return metrics


def _strategies(s: RunSettings, model, n_clients: int, client_nodes: dict[int, int], start_round: int,
                recorder: UpdateRecorder | None, log: _RoundLog):
    """The round's strategy and what the server runs: Flower's DP wrapper around it if configured, the
    eavesdropper outermost (it records what the server receives); under SecAgg+ the scheduled workflow."""
    if s.secagg:  # the server's recorder gets what SecAgg+ gives it: global models and unmasked sums
        strategy = ScheduledSecAgg(s, n_clients, client_nodes, {k: v.numpy() for k, v in model.state_dict().items()},
                                   on_round=lambda rnd, params: log(rnd - start_round, numpy_to_arrays(params)),
                                   recorder=recorder, round_offset=start_round)
        return strategy, strategy
    strategy = FedSerStrategy(
        algorithm=s.algorithm, lr=s.lr, model_replies=s.model_replies, eval_every=s.eval_every, num_rounds=s.rounds,
        round_offset=start_round, client_nodes=client_nodes, num_clients=n_clients, seed=s.seed,
        uniform_weights=s.flower_dp_mode in CENTRAL_DP_MODES,  # what the wrappers' noise is calibrated for
        fraction_train=s.fraction, fraction_evaluate=s.eval_fraction,
        min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,  # all were awaited once; later rounds go on with whoever is left
    )
    server = wrap_strategy(strategy, s, clients_per_round(n_clients, s.fraction))
    return strategy, (Eavesdropper(server, recorder, round_offset=start_round) if recorder is not None else server)


def _results(s: RunSettings, history: list[dict], n_train: list[int], seconds: dict, recorder: UpdateRecorder | None) -> dict:
    """results.json: the history, the last and the model-selected evaluations (best client validation UAR
    in the run's second half), short rounds, what DP spent and what was recorded."""
    evaluated = [r for r in history if "test_uar" in r]
    last = evaluated[-1] if evaluated else {}
    half = [r for r in evaluated if r["round"] > s.rounds // 2 and "val_uar" in r]
    best = max(half, key=lambda r: r["val_uar"]) if half else last
    pick = lambda r, *keys: {k: r.get(k) for k in keys}
    results = {
        "settings": s.to_run_config(), "num_clients": len(n_train), **seconds, "rounds": history,
        "final": pick(last, "test_acc", "test_uar", "test_counts", "round"),
        "selected": pick(best, "round", "val_uar", "test_acc", "test_uar", "test_counts"),
        "short_rounds": [r["round"] for r in history if r["replies"] < r["sampled"]],
    }
    took_part = [sum(p in r.get("clients", ()) for r in history) for p in range(len(n_train))]
    privacy = privacy_report(s, n_train, took_part)
    if privacy is not None:
        results["privacy"] = privacy
        print(f"[fed-ser] privacy ({privacy['mode']}): spent max {privacy['spent_epsilon_max']:.2f} "
              f"mean {privacy['spent_epsilon_mean']:.2f} at delta {privacy['delta']}: {privacy['guarantee']}")
    if recorder is not None:
        results["recorder"] = {"dir": s.recorder_dir, "updates": len(recorder.store), "bytes_per_update": recorder.store.bytes_per_update()}
    return results


def run_federated(grid: Grid, s: RunSettings, context: Context | None = None) -> dict:
    """Train for ``s.rounds`` rounds on the nodes of ``grid``; return the results dict.

    Under ``fl.secagg`` the same schedule runs in Flower's SecAgg+ workflow (:mod:`fed_ser.flower.secagg`,
    which needs the ServerApp's ``context``): the server then records the global models and each round's unmasked sum.

    After every round (Flower's ``evaluate_fn``: training and client evaluation done) the round's
    row is added to the history, the global model is evaluated on the held-out speakers when it is
    an evaluation round, and the checkpoint is written with the history so far (:class:`_RoundLog`).
    """
    grid = PromptGrid(grid, s.poll_interval)  # replies every fl.poll_interval s, not Flower's deployed grid's 3 s
    data = FederatedData.load(s.prepared)
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    start_round, history = _resume(s, model)
    recorder = _recorder(s, start_round)
    log = _RoundLog(s, data, start_round, history)
    n_clients = federation_size(s.min_available, data.num_clients)
    n_train = [len(data.client_rows(p, TRAIN)[1]) for p in range(n_clients)]
    check_privacy(s, n_clients)
    remaining = s.rounds - start_round
    try:
        client_nodes = discover_clients(grid, n_clients, Path(s.prepared).name) if remaining > 0 else {}
        t_discover = time.perf_counter() - log.t0  # the nodes' start and first message: once a run, not a round's cost
        log.strategy, server = _strategies(s, model, n_clients, client_nodes, start_round, recorder, log)
        if remaining > 0 and s.secagg:
            if context is None:
                raise ValueError("fl.secagg=true: run_federated needs the ServerApp's context (Flower's legacy workflow)")
            run_secagg(grid, context, s, log.strategy, remaining, max_weight=float(max(n_train)))
        elif remaining > 0:
            server.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
                         timeout=s.round_timeout, train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
                         evaluate_fn=log)
    finally:
        if recorder is not None:
            recorder.store.close()
    seconds = {"wall_seconds": time.perf_counter() - log.t0, "discover_seconds": t_discover, "rounds_run": remaining}
    results = _results(s, history, n_train, seconds, recorder)
    if s.out_dir:
        atomic_write_json(Path(s.out_dir) / "results.json", results)
    return results


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp using ``settings`` (Hydra CLI) or, if None, the run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings if settings is not None else RunSettings.from_run_config(context.run_config)
        run_federated(grid, s, context)

    return server_app


app = make_server_app()
