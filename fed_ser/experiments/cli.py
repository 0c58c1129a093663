"""Hydra CLI: ``fed-ser-train dataset=crema_d fl=fedsgd fl.rounds=200 model.dropout=0.4 fold=2``.

The config is composed with Hydra's compose API (``@hydra.main`` cannot wrap Flower's app
entry points) from ``conf/``; every paper knob is an override. Results land in ``out_dir``.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fed_ser.data.federated import FederatedData
from fed_ser.experiments.config import console, load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.recording.overwrite import check_overwrite
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.run.from_config import run_settings
from fed_ser.run.settings import ConfigError

__all__ = ["load_config", "run_fl", "run_settings", "run_vectorized_fl", "seconds_per_round"]  # run_settings: re-exported


def run_fl(cfg: DictConfig, prepared: Path, out_dir: str, recorder_dir: str = "") -> dict:
    """One Flower simulation on the prepared data; returns its results.json content."""
    from fed_ser.flower.simulation import simulate  # Flower's simulation engine (and Ray) load only for a Flower run

    settings = run_settings(cfg, prepared, out_dir, recorder_dir)
    check_overwrite(settings)  # here, not only in the ServerApp: one line before the simulation starts
    n = FederatedData.load(prepared).num_clients
    print(f"[fed-ser] {cfg.fl.algorithm} on {prepared.name}: {n} clients, {settings.rounds} rounds -> {out_dir}", flush=True)
    simulate(settings, n, cpus_per_client=float(cfg.simulation.cpus_per_client), ray_address=cfg.simulation.ray_address)
    results_path = Path(out_dir) / "results.json"
    if not results_path.exists():
        raise RuntimeError(f"the simulation ended without writing {results_path}; see the log above")
    return json.loads(results_path.read_text())


def seconds_per_round(results: dict) -> float | None:
    """A run's seconds a round from its results.json: the rounds' own time, without the nodes' discovery
    (Ray's actors or the SuperNodes starting, and each client's first message: a cost paid once a run),
    so that a 20-round measurement scales to 200 rounds; over the rounds this
    process ran (a resumed run's earlier rounds are in its history, not in its wall time)."""
    if "wall_seconds" not in results:
        return None
    rounds = results.get("rounds_run") or len(results.get("rounds") or ()) or int((results.get("final") or {}).get("round") or 0)
    return (results["wall_seconds"] - results.get("discover_seconds", 0.0)) / max(rounds, 1)


def run_vectorized_fl(cfg: DictConfig, prepared: Path, out_dir: str, recorder_dir: str = "") -> dict:
    """The same FL run on the vectorised in-process engine (the attacker's shadow training).

    Same settings, client selection, seeds and store format as :func:`run_fl`; no Ray, no
    messages. It does not resume: an unfinished run's records are dropped and it starts over.
    """
    from fed_ser.engines.vectorized import run_vectorized  # torch.func: loaded only for a run on this engine

    settings = run_settings(cfg, prepared, out_dir, recorder_dir)
    if settings.secagg:
        raise ConfigError("fl.secagg=true: SecAgg+ runs in the Flower engine only (private_engine=flower)")
    if settings.flower_dp_mode != "none":
        raise ConfigError(f"flower_dp.mode={settings.flower_dp_mode}: Flower's DP runs in the Flower engine only "
                          "(private_engine=flower, shadow.engine=flower)")
    data = FederatedData.load(prepared)
    print(f"[fed-ser] {cfg.fl.algorithm} (vectorised engine) on {prepared.name}: {data.num_clients} clients, "
          f"{settings.rounds} rounds -> {out_dir}", flush=True)
    check_overwrite(settings, start=0)  # this engine does not resume: it starts over, and drops no finished round unasked
    recorder = None
    if recorder_dir:
        store = UpdateStore(recorder_dir, mode="a")
        dropped = store.truncate_after_round(0)
        if dropped:
            print(f"[fed-ser] {recorder_dir}: dropped {dropped} recorded records "
                  f"({'recorder.overwrite=true' if settings.recorder_overwrite else 'an unfinished round'})", flush=True)
        recorder = UpdateRecorder(store, settings.algorithm, settings.lr, settings.layers(), settings.recorder_float16)
    if settings.dp_mode == "none" and settings.adv_mix == 0:
        res = run_vectorized(data, settings, recorder)
    else:  # the defences run inside the shared per-client loop only
        from fed_ser.engines.inprocess import run_inprocess

        print(f"[fed-ser] defence on (dp.mode={settings.dp_mode}, adv.mix={settings.adv_mix}): "
              "per-client in-process engine", flush=True)
        t0 = time.perf_counter()
        m = run_inprocess(data, settings, recorder)
        res = {"engine": "in-process", "settings": settings.to_run_config(), "num_clients": data.num_clients,
               "wall_seconds": time.perf_counter() - t0, "rounds": [],
               "final": {"test_acc": m["acc"], "test_uar": m["uar"], "test_counts": m.get("counts"), "round": settings.rounds}}
    res["selected"] = dict(res["final"])  # no client validation here: the last round is the model
    if recorder is not None:
        res["recorder"] = {"dir": recorder_dir, "updates": len(recorder.store),
                           "bytes_per_update": recorder.store.bytes_per_update()}
        recorder.store.close()
    atomic_write_json(Path(out_dir) / "results.json", res)
    return res


def with_overwrite_flag(args: list[str]) -> list[str]:
    """``--overwrite`` on a console script's command line as the override ``recorder.overwrite=true``."""
    return [a for a in args if a != "--overwrite"] + (["recorder.overwrite=true"] if "--overwrite" in args else [])


def expand_overrides(args: list[str]) -> tuple[bool, list[list[str]]]:
    """``[-m] a=x,y b=z`` -> (multirun?, one override list per run: the Cartesian product)."""
    multirun = bool(args) and args[0] in ("-m", "--multirun")
    if not multirun:
        return False, [list(args)]
    choices = []
    for o in args[1:]:
        key, _, value = o.partition("=")
        if "," in value and not value.startswith("["):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([o])
    return True, [list(c) for c in itertools.product(*choices)]


def table_iii(rows: list[dict]) -> str:
    """Markdown like the paper's Table III: final Acc/UAR per corpus, algorithm and fold, and the mean."""
    lines = ["| corpus | algorithm | fold | Acc | UAR |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['algorithm']} | {r['fold']} | {100 * r['acc']:.2f}% | {100 * r['uar']:.2f}% |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["corpus"], r["algorithm"]), []).append(r)
    for (corpus, alg), rs in groups.items():
        if len(rs) > 1:
            acc = sum(r["acc"] for r in rs) / len(rs)
            uar = sum(r["uar"] for r in rs) / len(rs)
            lines.append(f"| {corpus} | {alg} | mean of {len(rs)} | {100 * acc:.2f}% | {100 * uar:.2f}% |")
    return "\n".join(lines) + "\n"


@console
def prepare_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-prepare dataset=crema_d [fold=0] key=value ...``: build (or find) the
    prepared data set of this config and print its path (for ``flwr run --run-config data.prepared=...``);
    the client count, and the matching ``flwr run`` command, go to stderr."""
    cfg = load_config(list(sys.argv[1:] if argv is None else argv))
    path = prepare(cfg, [str(cfg.dataset.name)], int(cfg.fold)).resolve()
    n = FederatedData.load(path).num_clients
    print(f"[fed-ser] {path.name}: {n} clients. Simulate them all: flwr run . --run-config \"data.prepared='{path}'\" "
          f"--federation-config \"num-supernodes={n}\"", file=sys.stderr, flush=True)
    print(path)


@console
def train(argv: list[str] | None = None) -> None:
    """Console script: private FL training on one corpus and fold, with the recorder on.

    ``fed-ser-train -m fold=0,1,2,3,4`` runs each fold and writes ``runs/train/table_iii.md``; ``--overwrite``
    (``recorder.overwrite=true``) lets a rerun replace the updates an earlier run recorded in ``out_dir``.
    """
    multirun, runs = expand_overrides(with_overwrite_flag(list(sys.argv[1:] if argv is None else argv)))
    rows = []
    for overrides in runs:
        cfg = load_config(overrides)
        out = Path(cfg.out_dir)
        recorder_dir = str(out / "updates") if cfg.recorder.enabled else ""
        run_settings(cfg, Path("unprepared.npz"), str(out), recorder_dir)  # every run setting checked before the data is prepared
        prepared = prepare(cfg, [str(cfg.dataset.name)], int(cfg.fold))
        res = run_fl(cfg, prepared, str(out), recorder_dir)
        f = res["final"]
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
        rows.append(dict(corpus=cfg.dataset.name, algorithm=cfg.fl.algorithm, fold=int(cfg.fold), acc=f["test_acc"], uar=f["test_uar"]))
        atomic_write_text(out / "table_iii.md", table_iii(rows[-1:]))
        print(f"[fed-ser] done: test acc {f['test_acc']:.4f} UAR {f['test_uar']:.4f} -> {out / 'results.json'}")
    if multirun:
        path = Path(cfg.out_dir).parent / "table_iii.md"
        atomic_write_text(path, table_iii(rows))
        print(f"[fed-ser] Table III: {path}")


if __name__ == "__main__":
    train()
