"""The inversion stage of the feature-space attacks: the batch behind every recorded update and
every round sum, recovered at the global model of its round (FedSGD gradients and round sums:
:mod:`attacks.inference.inversion`; FedAvg updates: :mod:`attacks.inference.unrolled`),
and how much of the truth that is (checked against the private clients' rows: evaluation only,
never an input of an attack's score).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from attacks.inference.aggregate import round_aggregates
from attacks.inference.inversion import InversionJob, Recovered, inversion_workers, invert_all
from attacks.inference.simulate import LocalSettings
from attacks.inference.unrolled import invert_fedavg
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.experiments.settings import attack_settings
from fed_ser.recording.store import UpdateInfo, UpdateStore


def _workers(cfg: DictConfig, jobs: int) -> int:
    return inversion_workers(attack_settings(cfg).feature_space.workers, jobs)


def recover_batches(cfg: DictConfig, store: UpdateStore, updates: list, seed: int) -> list[Recovered]:
    """The feature-space attack's first step on every update: the batch behind it, at the global model of
    its round. FedSGD gradients: :func:`attacks.inference.inversion.invert_fedsgd` (each update's RANSAC
    draws come from ``(seed, round, client)``: the same batch is recovered whatever else is inverted, on
    however many processes, ``attack.feature_space.workers``). FedAvg updates ``theta - theta_k``:
    :func:`attacks.inference.unrolled.invert_fedavg` with the protocol's local settings (deterministic)."""
    if updates and updates[0].kind == "delta":
        return _recover_fedavg(cfg, store, updates)
    jobs = (InversionJob(store.attack_input(u), params, min(int(cfg.fl.batch_size), u.num_examples), (seed, u.round, u.client))
            for u, params in _at_global_models(store, updates))
    fs = attack_settings(cfg).feature_space
    out = invert_all(jobs, float(cfg.model.dropout), ransac_draws=fs.ransac_draws,
                     stall=fs.ransac_stall, give_up=fs.ransac_give_up, workers=_workers(cfg, len(updates)))
    return list(tqdm(out, total=len(updates), desc="inverting updates", unit="update", mininterval=5))


def _at_global_models(store: UpdateStore, updates: list) -> Iterator[tuple[UpdateInfo, dict[str, np.ndarray]]]:
    """Each update with the global model of its round, one model held at a time (updates come in round order)."""
    at, params = None, None
    for u in updates:
        if u.round != at:
            rec = store.global_record(u.round)
            if rec is None:
                raise ValueError(f"{store.path}: round {u.round} has no recorded global model (recorded before "
                                 "fed-ser stored it); run the FL again to use the feature-space attack")
            at, params = u.round, store.read(rec)
        yield u, params


def local_settings(cfg: DictConfig) -> LocalSettings:
    """The protocol's local settings as the server knows them (``fl.*``, ``model.dropout``)."""
    return LocalSettings(algorithm=str(cfg.fl.algorithm), lr=float(cfg.fl.lr), batch_size=int(cfg.fl.batch_size),
                         local_epochs=int(cfg.fl.local_epochs), optimizer=str(cfg.fl.optimizer), dropout=float(cfg.model.dropout))


def _recover_fedavg(cfg: DictConfig, store: UpdateStore, updates: list) -> list[Recovered]:
    settings = local_settings(cfg)
    pairs = tqdm(_at_global_models(store, updates), total=len(updates), desc="inverting FedAvg updates", unit="update",
                 mininterval=5)
    return [invert_fedavg(store.read(u), params, u.num_examples, settings) for u, params in pairs]


def recovery_report(recovered: list[Recovered], updates: list, data: FederatedData) -> dict:
    """How much of the private batches was recovered, checked against the clients' true rows: exactly
    (max-abs within 1e-3 of the largest feature), within 10% and 25% relative L2 error of a true
    utterance, and, for the sign patterns a several-step Adam update leaves, with >= 95% of the signs right.
    Each counts recovered inputs near some true utterance (two inputs near one utterance both count)."""
    exact = found = total = near10 = near25 = signs = 0
    for rec, u in zip(recovered, updates):
        total += rec.batch_size
        found += len(rec.inputs)
        if len(rec.inputs):
            X, _ = data.client_rows(u.client, TRAIN)
            dist = np.abs(rec.inputs[:, None, :] - X[None]).max(2).min(1) / (np.abs(X).max() + 1e-12)
            exact += int((dist < 1e-3).sum())
            rel = (np.linalg.norm(rec.inputs[:, None] - X[None], axis=2) / (np.linalg.norm(X, axis=1)[None] + 1e-12)).min(1)
            near10, near25 = near10 + int((rel < 0.1).sum()), near25 + int((rel < 0.25).sum())
            agree = (np.sign(rec.inputs)[:, None, :] == np.sign(X)[None]).mean(2).max(1)  # share of signs right
            signs += int((agree >= 0.95).sum())
    return {"updates": len(recovered), "complete_updates": int(sum(r.complete for r in recovered)),
            "utterances_in_batches": total, "recovered": found, "recovered_exactly": exact,
            "recovered_within_10pct": near10, "recovered_within_25pct": near25, "recovered_signs_95pct": signs,
            "sign_patterns_only": bool(recovered) and not any(r.info.get("magnitude", True) for r in recovered),
            "share_recovered": found / max(total, 1), "share_exact": exact / max(found, 1)}



def invert_aggregates(cfg: DictConfig, store: UpdateStore, data: FederatedData, seed: int,
                      members: dict[int, tuple[int, ...]] | None = None, server_view: bool = False) -> tuple[list, dict]:
    """The observer of aggregates' first step: the batch behind each round's sum, inverted at the round's
    global model; reported with what was recovered and each round's true share of female clients.
    ``members`` and ``server_view``: see :func:`attacks.inference.aggregate.round_aggregates` (SecAgg+)."""
    t0 = time.perf_counter()
    aggs = round_aggregates(store, int(cfg.fl.batch_size), members, server_view)
    fs = attack_settings(cfg).feature_space
    draws = fs.aggregate_draws
    inverted = invert_all((InversionJob(a.update, a.params, a.batch_size, (seed + 7, a.round)) for a in aggs),
                          float(cfg.model.dropout), ransac_draws=draws, stall=fs.ransac_stall, give_up=fs.ransac_give_up,
                          workers=_workers(cfg, len(aggs)))
    out = list(zip(aggs, tqdm(inverted, total=len(aggs), desc="inverting round aggregates", unit="round", mininterval=5)))
    female = {p: data.client_gender[p] == "F" for a in aggs for p in a.clients}
    found = sum(len(r.inputs) for _, r in out)
    near = {1e-3: 0, 1e-2: 0}  # recovered inputs within this (relative, max-abs) of a true input of the round
    for a, r in out:
        if len(r.inputs):
            X = np.concatenate([data.client_rows(p, TRAIN)[0] for p in a.clients])
            dist = np.array([np.abs(X - x).max(1).min() for x in r.inputs]) / (np.abs(X).max() + 1e-12)
            for tol in near:
                near[tol] += int((dist < tol).sum())
    # the truth, from the evaluator's data (under SecAgg+ the attacker only bounds it by batch size x members)
    n = {p: len(data.client_rows(p, TRAIN)[1]) for a in aggs for p in a.clients}
    batch = lambda p: min(int(cfg.fl.batch_size), n[p]) if cfg.fl.algorithm == "fedsgd" else n[p]
    return out, {"rounds": len(out), "utterances_in_rounds": int(sum(batch(p) for a in aggs for p in a.clients)),
                 "recovered": int(found), "recovered_exactly": near[1e-3], "recovered_within_1e-2": near[1e-2],
                 "female_share": [float(np.mean([female[p] for p in a.clients])) for a in aggs],
                 "ransac_draws": draws, "seconds": time.perf_counter() - t0}



def check_inversion_settings(cfg: DictConfig) -> None:
    """Stop on a wrong ``attack.feature_space`` inversion value before any federation runs (checked by
    its declaration, :class:`attacks.inference.settings.FeatureSpaceSettings`)."""
    attack_settings(cfg)
