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


def run_federated(grid: Grid, s: RunSettings, context: Context | None = None) -> dict:
    """Train for ``s.rounds`` rounds on the nodes of ``grid``; return the results dict.

    Under ``fl.secagg`` the same schedule runs in Flower's SecAgg+ workflow (:mod:`fed_ser.flower.secagg`,
    which needs the ServerApp's ``context``): the server then records the global models and each round's unmasked sum.

    After every round (Flower's ``evaluate_fn``: training and client evaluation done) the round's
    row is added to the history, the global model is evaluated on the held-out speakers when it is
    an evaluation round, and the checkpoint is written with the history so far.
    """
    grid = PromptGrid(grid, s.poll_interval)  # replies every fl.poll_interval s, not Flower's deployed grid's 3 s
    data = FederatedData.load(s.prepared)
    out = Path(s.out_dir) if s.out_dir else None
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    start_round, history = 0, []
    ckpt = out / CHECKPOINT if out else None
    if s.resume and ckpt is not None and ckpt.exists():
        start_round, params = load_checkpoint(ckpt, s)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        history = [r for r in checkpoint_history(ckpt) if r["round"] <= start_round]
    recorder = None
    if s.recorder_dir:
        check_overwrite(s, start_round)  # records of finished rounds are dropped only under recorder.overwrite=true
        store = UpdateStore(s.recorder_dir, mode="a")
        dropped = store.truncate_after_round(start_round)
        if dropped:
            print(f"[fed-ser] resumed at round {start_round}: dropped {dropped} recorded updates of unfinished rounds")
        recorder = UpdateRecorder(store, s.algorithm, s.lr, s.layers(), s.recorder_float16, model_replies=s.model_replies)
    X_test, y_test = data.test_rows()
    test_speakers = data.test_speakers()  # per-speaker counts: the SER UAR's interval over held-out speakers
    eval_model = build_model(data.X.shape[1], s.dropout, s.seed)
    t0 = time.perf_counter()
    n_clients = federation_size(s.min_available, data.num_clients)
    n_train = [len(data.client_rows(p, TRAIN)[1]) for p in range(n_clients)]
    check_privacy(s, n_clients)
    try:
        remaining = s.rounds - start_round
        client_nodes = discover_clients(grid, n_clients, Path(s.prepared).name) if remaining > 0 else {}
        t_discover = time.perf_counter() - t0  # the nodes' start and first message: once a run, not a round's cost
        if s.secagg:  # the server's recorder gets what SecAgg+ gives it: global models and unmasked sums
            strategy = ScheduledSecAgg(s, n_clients, client_nodes, {k: v.numpy() for k, v in model.state_dict().items()},
                                       on_round=lambda rnd, params: evaluate_fn(rnd - start_round, numpy_to_arrays(params)),
                                       recorder=recorder, round_offset=start_round)
        else:
            strategy = FedSerStrategy(
                algorithm=s.algorithm, lr=s.lr, model_replies=s.model_replies, eval_every=s.eval_every, num_rounds=s.rounds,
                round_offset=start_round, client_nodes=client_nodes, num_clients=n_clients, seed=s.seed,
                uniform_weights=s.flower_dp_mode in CENTRAL_DP_MODES,  # what the wrappers' noise is calibrated for
                fraction_train=s.fraction, fraction_evaluate=s.eval_fraction,
                min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,  # all were awaited once; later rounds go on with whoever is left
            )
            # Flower's DP wraps the strategy; the eavesdropper wraps both: it records what the server receives
            server = wrap_strategy(strategy, s, clients_per_round(n_clients, s.fraction))
            if recorder is not None:
                server = Eavesdropper(server, recorder, round_offset=start_round)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            rnd = server_round + start_round
            row = {"sampled": 0, "replies": 0, "train_loss": None, **strategy.rounds.get(rnd, {"round": rnd})}
            line = f"[fed-ser] round {rnd}/{s.rounds}: {row['replies']}/{row['sampled']} replies"
            metrics = None
            if strategy.is_eval_round(rnd):
                eval_model.load_state_dict(arrays.to_torch_state_dict())
                m = evaluate(eval_model, X_test, y_test, test_speakers)
                row.update(test_acc=m["acc"], test_uar=m["uar"], test_counts=m.get("counts"))
                line += f", test acc {m['acc']:.3f} UAR {m['uar']:.3f}"
                metrics = MetricRecord({"test-acc": m["acc"], "test-uar": m["uar"]})
            if rnd == 1 or "test_uar" in row or row["replies"] < row["sampled"]:  # started / progress / a node lost
                print(f"{line} ({time.perf_counter() - t0:.1f} s)", flush=True)
            history.append(row)
            if ckpt is not None:
                save_checkpoint(ckpt, rnd, s, arrays_to_numpy(arrays), history)
            return metrics

        if remaining > 0 and s.secagg:
            if context is None:
                raise ValueError("fl.secagg=true: run_federated needs the ServerApp's context (Flower's legacy workflow)")
            run_secagg(grid, context, s, strategy, remaining, max_weight=float(max(n_train)))
        elif remaining > 0:
            server.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
                           timeout=s.round_timeout, train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
                           evaluate_fn=evaluate_fn)
    finally:
        if recorder is not None:
            recorder.store.close()
    evaluated = [r for r in history if "test_uar" in r]
    last = evaluated[-1] if evaluated else {}
    half = [r for r in evaluated if r["round"] > s.rounds // 2 and "val_uar" in r]
    best = max(half, key=lambda r: r["val_uar"]) if half else last
    results = {
        "settings": s.to_run_config(), "num_clients": n_clients,
        "wall_seconds": time.perf_counter() - t0, "discover_seconds": t_discover, "rounds_run": remaining, "rounds": history,
        "final": {"test_acc": last.get("test_acc"), "test_uar": last.get("test_uar"), "test_counts": last.get("test_counts"),
                  "round": last.get("round")},
        "selected": {"round": best.get("round"), "val_uar": best.get("val_uar"), "test_acc": best.get("test_acc"),
                     "test_uar": best.get("test_uar"), "test_counts": best.get("test_counts")},
        "short_rounds": [r["round"] for r in history if r["replies"] < r["sampled"]],
    }
    took_part = [sum(p in r.get("clients", ()) for r in history) for p in range(n_clients)]
    privacy = privacy_report(s, n_train, took_part)
    if privacy is not None:
        results["privacy"] = privacy
        print(f"[fed-ser] privacy ({privacy['mode']}): spent max {privacy['spent_epsilon_max']:.2f} "
              f"mean {privacy['spent_epsilon_mean']:.2f} at delta {privacy['delta']}: {privacy['guarantee']}")
    if recorder is not None:
        results["recorder"] = {"dir": s.recorder_dir, "updates": len(recorder.store), "bytes_per_update": recorder.store.bytes_per_update()}
    if out is not None:
        atomic_write_json(out / "results.json", results)
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
