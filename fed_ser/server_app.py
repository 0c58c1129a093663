"""Flower ServerApp: FedSGD/FedAvg with the eavesdropping recorder and global evaluation.

Results land in ``out_dir``: ``results.json`` (per-round metrics, final and model-selected test
Acc/UAR, replies per round), ``checkpoint.npz`` (global model after the last finished round, so a
restarted run resumes there and the recorder appends after the last complete round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.checkpoint import NAME as CHECKPOINT, load_checkpoint, save_checkpoint
from fed_ser.io import atomic_write_json
from fed_ser.model import build_model
from fed_ser.recorder import UpdateRecorder
from fed_ser.settings import RunSettings
from fed_ser.store import UpdateStore
from fed_ser.strategy import FedSerStrategy, Recorder, arrays_to_numpy
from fed_ser.training import evaluate, privacy_report


def discover_partitions(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """Wait for ``expected`` nodes, ask each which partition it holds; return partition -> node id.

    Nodes that do not answer within ``timeout`` are left out (they will not be selected).
    Two nodes claiming one partition is a deployment error and stops the run.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    print(f"[fed-ser] waiting for {expected} nodes", flush=True)
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)
    queries = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            print(f"[fed-ser] node {reply.metadata.src_node_id} did not say its partition: {reply.error.reason}", flush=True)
            continue
        pid = int(reply.content.metric_records["metrics"]["partition-id"])
        if pid in found:
            raise RuntimeError(f"nodes {found[pid]} and {reply.metadata.src_node_id} both hold partition-id={pid}")
        found[pid] = reply.metadata.src_node_id
    print(f"[fed-ser] {len(node_ids)} nodes connected, {len(found)} hold partitions {sorted(found)} "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    return found


def run_federated(grid: Grid, s: RunSettings) -> dict:
    """Train for ``s.rounds`` rounds on the nodes of ``grid``; return the results dict."""
    data = FederatedData.load(s.prepared)
    out = Path(s.out_dir) if s.out_dir else None
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    start_round, history = 0, []
    ckpt = out / CHECKPOINT if out else None
    if s.resume and ckpt is not None and ckpt.exists():
        start_round, params = load_checkpoint(ckpt, s)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        prev = out / "results.json"
        if prev.exists():
            history = [r for r in json.loads(prev.read_text()).get("rounds", []) if r["round"] <= start_round]
    recorder = None
    if s.recorder_dir:
        store = UpdateStore(s.recorder_dir)
        dropped = store.truncate_after_round(start_round)
        if dropped:
            print(f"[fed-ser] resumed at round {start_round}: dropped {dropped} recorded updates of unfinished rounds")
        recorder = Recorder(UpdateRecorder(store, s.algorithm, s.lr, s.layers(), s.recorder_float16))
    X_test, y_test = data.test_rows()
    eval_model = build_model(data.X.shape[1], s.dropout, s.seed)
    t0 = time.perf_counter()

    def on_round_end(rnd: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> None:
        row = {"round": rnd, "sampled": strategy.sampled_per_round.get(rnd, 0),
               "replies": strategy.replies_per_round.get(rnd, 0),
               "train_loss": float(metrics["train-loss"]) if metrics else None}
        line = f"[fed-ser] round {rnd}/{s.rounds}: {row['replies']}/{row['sampled']} replies"
        if strategy.is_eval_round(rnd):
            eval_model.load_state_dict(arrays.to_torch_state_dict())
            m = evaluate(eval_model, X_test, y_test)
            row.update(test_acc=m["acc"], test_uar=m["uar"])
            line += f", test acc {m['acc']:.3f} UAR {m['uar']:.3f}"
        if rnd == 1 or "test_uar" in row or row["replies"] < row["sampled"]:  # started / progress / a node lost
            print(f"{line} ({time.perf_counter() - t0:.1f} s)", flush=True)
        history.append(row)
        if ckpt is not None:
            save_checkpoint(ckpt, rnd, s, arrays_to_numpy(arrays))

    remaining = s.rounds - start_round
    n_avail = s.min_available or data.num_clients
    partition_nodes = discover_partitions(grid, n_avail) if remaining > 0 else {}
    strategy = FedSerStrategy(
        algorithm=s.algorithm, lr=s.lr, recorder=recorder, eval_every=s.eval_every, num_rounds=s.rounds,
        round_offset=start_round, on_round_end=on_round_end, partition_nodes=partition_nodes,
        num_clients=n_avail, seed=s.seed, fraction_train=s.fraction,
        fraction_evaluate=s.eval_fraction, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,  # all n_avail were awaited once (discover_partitions); later rounds go on with whoever is left
    )
    result = None
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining, timeout=s.round_timeout,
                                train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    # Client-side validation UAR per evaluated round (for model selection, as in the paper).
    if result is not None:
        for rnd, m in result.evaluate_metrics_clientapp.items():
            for row in history:
                if row["round"] == rnd + start_round:
                    row["val_uar"] = float(m["val-uar"])
    evaluated = [r for r in history if "test_uar" in r]
    last = evaluated[-1] if evaluated else {}
    half = [r for r in evaluated if r["round"] > s.rounds // 2 and "val_uar" in r]
    best = max(half, key=lambda r: r["val_uar"]) if half else last
    results = {
        "settings": s.to_run_config(), "num_clients": data.num_clients,
        "wall_seconds": time.perf_counter() - t0, "rounds": history,
        "final": {"test_acc": last.get("test_acc"), "test_uar": last.get("test_uar"), "round": last.get("round")},
        "selected": {"round": best.get("round"), "val_uar": best.get("val_uar"), "test_acc": best.get("test_acc"), "test_uar": best.get("test_uar")},
        "short_rounds": [r["round"] for r in history if r["replies"] < r["sampled"]],
    }
    privacy = privacy_report(s, [len(data.client_rows(p, TRAIN)[1]) for p in range(data.num_clients)])
    if privacy is not None:
        results["privacy"] = privacy
        print(f"[fed-ser] privacy ({s.dp_mode}): target epsilon {s.dp_epsilon}, spent max "
              f"{privacy['spent_epsilon_max']:.2f} mean {privacy['spent_epsilon_mean']:.2f} at delta {s.dp_delta}")
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
        run_federated(grid, s)

    return server_app


app = make_server_app()
