"""One-command attribute inference experiment (the paper's Section 4-5), under a chosen threat model.

``fed-ser-experiment private=iemocap features=emobase fl=fedsgd`` runs, for each configured
fold: private FL training on the private corpus (recorded), shadow FL training on the attacker's
data (recorded), attack training on the shadow updates labelled with the shadow clients' gender,
and evaluation on the private updates. Where the attacker's data come from is ``shadow.mode``:

* ``corpora``: other corpora (the paper's threat model; by default the paper's corpora other than
  the private one, real where ``data.roots`` names them, else their synthetic twins);
* ``speakers``: other speakers of the private corpus, disjoint from every private client (a
  seeded, gender-balanced split of each fold's training speakers, ``shadow.speaker_share``);
* ``synthetic``: the synthetic corpora only, whatever ``data.roots`` says.

The folds are the private corpus's speaker-independent SER splits; the attacker's corpora do not
depend on them. So under ``corpora`` and ``synthetic`` one shadow federation (on the attacker's
corpora's fold 0) and one attack CNN serve every fold (``shadow.per_fold=false``, the default); the
attack is then trained once per cell and evaluated on each fold's private updates.
``shadow.per_fold=true`` trains each fold's own, on the attacker's corpora's same fold.
``speakers`` always does: its attacker holds a share of each fold's own training speakers.

Every attack is scored with its ASR and 95% interval (bootstrap over attacked clients), ROC AUC
and TPR at 10% / 1% FPR, per fold and pooled over the folds' clients.
``attack.with_control=true`` also trains every attack on shuffled shadow genders (it must fall to
chance), ``attack.control=true`` runs only that. ``-m`` sweeps comma-separated overrides.

Results: ``<out_dir>/results.json``, ``results.csv``, ``report.md``, ``asr.png`` and ``roc.png``; a
multirun also writes ``<grid_dir>/grid.csv``, ``grid_report.md`` and ``grid_roc.png`` over every
finished cell there.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from attacks.inference.aggregate import RoundAggregate, differencing_scores, round_aggregates
from attacks.inference.data import UpdateDataset, labelled_updates
from attacks.inference.evaluate import Evaluation, average_evaluations, evaluate_attack, summarize
from attacks.inference.feature_space import DRAWS_FROM, emotion_means, pooled, train_feature_space_attack
from attacks.inference.inversion import InversionJob, Recovered, inversion_workers, invert_all
from attacks.inference.profile import pooled_scorer, train_profile_attack, update_profiles
from attacks.inference.train import AttackConfig, predict, train_attack
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.data.synthetic import PAPER_CORPORA
from fed_ser.experiments.cli import console, expand_overrides, load_config, run_fl, run_settings, run_vectorized_fl, seconds_per_round
from fed_ser.experiments.prepare import CorpusSource, corpus_source, prepare
from fed_ser.experiments.report import write_defense_report, write_grid_report, write_run_report
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.recording.checkpoint import fingerprint
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import ConfigError

SHADOW_MODES = ("corpora", "speakers", "synthetic")
FOLD_KEY = 100_000  # client key = fold * FOLD_KEY + client id: clients of all folds pooled in one interval


def attack_config(cfg: DictConfig) -> AttackConfig:
    """The attack CNN's hyper-parameters from ``cfg.attack`` (conf/attack/)."""
    a = cfg.attack
    return AttackConfig(layers=list(a.layers), lr=float(a.lr), weight_decay=float(a.weight_decay),
                        batch_size=int(a.batch_size), max_epochs=int(a.max_epochs), patience=int(a.patience),
                        val_share=float(a.val_share), channels=tuple(a.channels), kernel=int(a.kernel),
                        pools=tuple(a.pools), first_stride=int(a.first_stride), dropout=float(a.dropout), max_updates=int(a.max_updates), seed=int(a.seed),
                        precision=str(a.precision))


@dataclass(frozen=True)
class ThreatModel:
    """The private federation and the attacker's data for one fold (``shadow.mode``)."""

    mode: str
    private: str  # the private corpus as reports name it, e.g. "emodb" or "iemocap (synthetic)"
    shadow: tuple[str, ...]  # the attacker's corpora, likewise
    private_data: Path
    shadow_data: Path

    def describe(self) -> str:
        if self.mode == "speakers":
            return f"shadow.mode=speakers: the attacker holds other speakers of {self.private}, disjoint from every private client"
        return f"shadow.mode={self.mode}: the attacker's shadow federations train on {', '.join(self.shadow)}"


def check_threat_model(cfg: DictConfig) -> CorpusSource:
    """Stop on a wrong ``shadow.*`` or inversion value or private root before anything is prepared or written;
    return where the private corpus comes from."""
    if str(cfg.shadow.mode) not in SHADOW_MODES:
        raise ConfigError(f"shadow.mode: {str(cfg.shadow.mode)!r} is not one of {SHADOW_MODES}")
    if not 0.0 < float(cfg.shadow.share) <= 1.0:
        raise ConfigError(f"shadow.share: must be in (0, 1], got {float(cfg.shadow.share)}")
    if not isinstance(cfg.shadow.get("per_fold"), bool):
        raise ConfigError(f"shadow.per_fold: must be true or false, got {cfg.shadow.get('per_fold')!r}")
    _workers(cfg, 0)  # a wrong attack.feature_space.workers, ransac_stall or ransac_give_up stops here, not after the federations
    _stall(cfg)
    _give_up(cfg)
    return corpus_source(cfg, str(cfg.private))


def shadow_fold(cfg: DictConfig, fold: int) -> int:
    """The fold of the attacker's data that private fold ``fold`` is attacked with: the fold itself under
    ``shadow.per_fold=true`` or ``shadow.mode=speakers`` (whose attacker holds that fold's own training
    speakers), else fold 0, so that every fold shares one shadow federation and one attack."""
    return fold if bool(cfg.shadow.per_fold) or str(cfg.shadow.mode) == "speakers" else 0


def threat_model(cfg: DictConfig, fold: int) -> ThreatModel:
    """Prepare the private and the shadow data sets of ``fold`` under ``shadow.mode``."""
    src = check_threat_model(cfg)
    mode, private, share = str(cfg.shadow.mode), str(cfg.private), float(cfg.shadow.share)
    if mode == "speakers":
        priv = prepare(cfg, [src], fold, speaker_role="private", tag=f"{private}-private")
        shadow = prepare(cfg, [src], fold, train_share=share, speaker_role="attacker", tag=f"{private}-attacker")
        return ThreatModel(mode, src.label, (src.label,), priv, shadow)
    if mode == "corpora":
        names = [str(c) for c in cfg.shadow.corpora] or [c for c in PAPER_CORPORA if c != private]
        if private in names:
            raise ConfigError(f"shadow.corpora: {names} must not contain the private corpus {private!r} "
                              "(shadow.mode=speakers splits one corpus's speakers instead)")
        shadow_src = [corpus_source(cfg, c) for c in names]
    else:  # synthetic: the attacker has only the synthetic corpora (never the private corpus' own data)
        shadow_src = [corpus_source(cfg, c, synthetic=True) for c in PAPER_CORPORA if not (src.synthetic and c == private)]
    priv = prepare(cfg, [src], fold)
    shadow = prepare(cfg, shadow_src, shadow_fold(cfg, fold), train_share=share,
                     tag="shadow-" + "+".join(s.corpus + ("-synthetic" if s.synthetic else "") for s in shadow_src))
    return ThreatModel(mode, src.label, tuple(s.label for s in shadow_src), priv, shadow)


def run_key(cfg: DictConfig, prepared: Path, engine: str) -> str:
    """What a recorded FL run is known by: every setting that shapes its updates or its SER numbers.

    The checkpoint's fingerprint (the run settings, the content-keyed data file) plus client
    evaluation and the engine; not the number of rounds (a longer run extends a shorter one, as a
    resume does) nor operational settings (paths, timeouts).
    """
    s = run_settings(cfg, prepared, "")
    key = {"run": json.loads(fingerprint(s)), "eval": [s.eval_every, s.eval_fraction], "engine": engine}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def train_recorded(cfg: DictConfig, prepared: Path, fold_dir: Path, role: str, engine: str = "flower") -> dict:
    """Run, or reuse, the recorded FL run ``role`` (private / shadow) of these settings.

    Each run lives in ``<fold_dir>/<role>-<run key>``: a run of other settings is never reused nor
    written over; the same settings reuse a finished run and resume an unfinished or shorter one.
    """
    if engine not in ("flower", "vectorised"):
        raise ConfigError(f"private_engine / shadow.engine: {engine!r} is not 'flower' or 'vectorised'")
    out = fold_dir / f"{role}-{run_key(cfg, prepared, engine)}"
    done = out / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("final", {}).get("round") == int(cfg.fl.rounds):
            res["dir"] = str(out)
            return res
    run = run_fl if engine == "flower" else run_vectorized_fl
    return {**run(cfg, prepared, str(out), str(out / "updates")), "dir": str(out)}


def _shuffled_genders(updates: list, labels: np.ndarray, seed: int) -> np.ndarray:
    """The control: shadow labels permuted across shadow clients (a client keeps one label)."""
    parts = np.array([u.client for u in updates])
    uniq = np.unique(parts)
    first = {p: labels[parts == p][0] for p in uniq}
    fake = dict(zip(uniq.tolist(), np.random.default_rng(seed + 99).permutation([first[p] for p in uniq])))
    return np.array([fake[p] for p in parts])


def _control_permutations(cfg: DictConfig) -> int:
    n = int(cfg.attack.control_permutations)
    if n < 1:
        raise ConfigError(f"attack.control_permutations: must be >= 1, got {n}")
    return n


def client_speakers(data: FederatedData) -> np.ndarray:
    """Each client's speaker as ``<corpus>/<speaker>`` (speaker ids repeat across corpora)."""
    return np.char.add(np.char.add(data.client_corpus.astype(str), "/"), data.client_speaker.astype(str))


def _shuffled_client_genders(data: FederatedData, seed: int) -> FederatedData:
    """The control for attacks trained on the attacker's data: its speakers' genders permuted (all
    clients of a speaker keep one label, as the feature-space attack draws clients from speakers)."""
    speaker = client_speakers(data)
    names = np.unique(speaker)
    own = {s: data.client_gender[speaker == s][0] for s in names}
    fake = dict(zip(names.tolist(), np.random.default_rng(seed + 99).permutation([own[s] for s in names])))
    return replace(data, client_gender=np.array([fake[s] for s in speaker.tolist()]))


@dataclass
class FoldAttacks:
    """One fold's attack evaluations (kept unsummarised so folds pool into one interval)."""

    evaluations: dict[str, Evaluation]  # attack name ("cnn", "profile", "cnn-control", ...) -> evaluation
    per_layer: dict[str, float]  # CNN ASR per SER layer without fusion
    fusion_weights: dict[str, float]
    history: list[dict]
    inversion: dict | None = None  # how much of the private batches the feature-space attack recovered
    aggregate: dict | None = None  # the observer of aggregates: round sums inverted, utterances recovered, female shares
    signal: dict | None = None  # per attacked client: true and recovered statistics (see :func:`client_signal`)


#: Under SecAgg+: the server's differencing attack on the sums it unmasks (its feature-space attack).
SERVER_SUMS = "server-sum-differencing"


def _stall(cfg: DictConfig) -> int:
    stall = int(cfg.attack.feature_space.ransac_stall)
    if stall < 0:
        raise ConfigError(f"attack.feature_space.ransac_stall: must be >= 0 (0: every pass draws its whole budget), got {stall}")
    return stall


def _give_up(cfg: DictConfig) -> int:
    give_up = int(cfg.attack.feature_space.ransac_give_up)
    if give_up < 0:
        raise ConfigError(f"attack.feature_space.ransac_give_up: must be >= 0 (0: a fruitless pass draws its whole budget), "
                          f"got {give_up}")
    return give_up


def _workers(cfg: DictConfig, jobs: int) -> int:
    try:
        return inversion_workers(int(cfg.attack.feature_space.workers), jobs)
    except ValueError as e:
        raise ConfigError(f"attack.feature_space.workers: {e}") from None


def recover_batches(cfg: DictConfig, store: UpdateStore, updates: list, seed: int) -> list[Recovered]:
    """The feature-space attack's first step on every update: the batch behind it (see
    :mod:`attacks.inference.inversion`), at the global model of its round. FedAvg updates are inverted as
    pseudo-gradients (one local epoch: one error per sample); what survives is reported. Each update's
    RANSAC draws come from ``(seed, round, client)``: the same batch is recovered whatever else is
    inverted, on however many processes (``attack.feature_space.workers``)."""
    def jobs():
        at, params = None, None  # one global model held at a time (updates are in round order; any other only re-reads)
        for u in updates:
            if u.round != at:
                rec = store.global_record(u.round)
                if rec is None:
                    raise ValueError(f"{store.path}: round {u.round} has no recorded global model (recorded before "
                                     "fed-ser stored it for FedSGD); run the FL again to use the feature-space attack")
                at, params = u.round, store.read(rec)
            batch = min(int(cfg.fl.batch_size), u.num_examples) if u.kind == "gradient" else u.num_examples
            yield InversionJob(store.attack_input(u), params, batch, (seed, u.round, u.client))

    out = invert_all(jobs(), float(cfg.model.dropout), ransac_draws=int(cfg.attack.feature_space.ransac_draws),
                     stall=_stall(cfg), give_up=_give_up(cfg), workers=_workers(cfg, len(updates)))
    return list(tqdm(out, total=len(updates), desc="inverting updates", unit="update", mininterval=5))


def _recovery_report(recovered: list[Recovered], updates: list, data: FederatedData) -> dict:
    """How much of the private batches was recovered, checked against the clients' true rows."""
    exact = found = total = 0
    for rec, u in zip(recovered, updates):
        total += rec.batch_size
        found += len(rec.inputs)
        if len(rec.inputs):
            X, _ = data.client_rows(u.client, TRAIN)
            dist = np.abs(rec.inputs[:, None, :] - X[None]).max(2).min(1) / (np.abs(X).max() + 1e-12)
            exact += int((dist < 1e-3).sum())
    return {"updates": len(recovered), "complete_updates": int(sum(r.complete for r in recovered)),
            "utterances_in_batches": total, "recovered": found, "recovered_exactly": exact,
            "share_recovered": found / max(total, 1), "share_exact": exact / max(found, 1)}


def _run_attacks(cfg: DictConfig, fold: int, shadow_store: UpdateStore, s_updates: list, s_labels: np.ndarray,
                 priv_store: UpdateStore, p_updates: list, p_labels: np.ndarray, suffix: str = "",
                 shadow_data: FederatedData | None = None, recovered: list[Recovered] | None = None,
                 cnn: bool = True, aggregates: dict[str, list[tuple[RoundAggregate, Recovered]]] | None = None,
                 client_gender: np.ndarray | None = None, trained: dict | None = None) -> FoldAttacks:
    """Train every enabled attack on the shadow updates and evaluate it on the private ones.

    ``trained`` holds the attacks already trained in this cell, by shadow store and labels: a fold whose
    shadow federation is another fold's (:func:`shadow_fold`) evaluates that fold's CNN and profile
    attack instead of training them again."""
    trained = {} if trained is None else trained
    key = (str(shadow_store.path), hashlib.sha256(s_labels.tobytes()).hexdigest()) if shadow_store is not None else None
    acfg = attack_config(cfg)
    trials, seed, pools = int(cfg.attack.trials), int(cfg.attack.seed), [int(k) for k in cfg.attack.pool_rounds]
    clients = np.array([u.client for u in p_updates]) + fold * FOLD_KEY
    ev, layers, weights, history = {}, {}, {}, []
    if cnn:
        if ("cnn", *key) in trained:
            print(f"[attack] fold {fold}: the CNN trained on these {len(s_updates)} shadow updates{suffix}", flush=True)
        else:
            print(f"[attack] fold {fold}: CNN on {len(s_updates)} shadow updates, layers {acfg.layers}{suffix}", flush=True)
            trained["cnn", *key] = train_attack(shadow_store, s_updates, s_labels, acfg)
        cnn_attack = trained["cnn", *key]
        fused, per_layer = predict(cnn_attack.model, UpdateDataset(priv_store, p_updates, p_labels, acfg.layers, cnn_attack.stats))
        ev[f"cnn{suffix}"] = evaluate_attack(lambda idx: float(fused[idx].mean()), fused, clients, p_labels,
                                             trials=trials, pool_rounds=pools, seed=seed)
        layers = {l: float(np.mean(list(evaluate_attack(lambda idx, p=p: float(p[idx].mean()), p, clients, p_labels,
                                                        trials=trials, seed=seed).success["1"].values())))
                  for l, p in per_layer.items()}
        weights, history = dict(zip(acfg.layers, cnn_attack.model.fusion_weights.tolist())), cnn_attack.history
    pc = cfg.attack.profile
    if pc.enabled and s_updates and p_updates:
        layer = str(pc.layer)
        if ("profile", *key) not in trained:
            trained["profile", *key] = train_profile_attack(update_profiles(shadow_store, s_updates, layer), s_labels, layer,
                                                            float(pc.l2))
        attack = trained["profile", *key]
        profiles = update_profiles(priv_store, p_updates, layer)
        ev[f"profile{suffix}"] = evaluate_attack(pooled_scorer(attack, profiles), attack.p_female(profiles), clients,
                                                 p_labels, trials=trials, pool_rounds=pools, seed=seed)
    fs = cfg.attack.feature_space
    if fs.enabled and shadow_data is not None and (recovered or any((aggregates or {}).values())):
        draws_from = str(fs.draws_from)
        if draws_from not in DRAWS_FROM:
            raise ConfigError(f"attack.feature_space.draws_from: {draws_from!r} is not one of {DRAWS_FROM}")
        # virtual clients draw on every row of the attacker's own clients (its validation rows are its data too);
        # re-sampled shards keep their training rows, as fed-ser's first version did
        rows = shadow_data.client >= 0 if draws_from == "speakers" else shadow_data.split == TRAIN
        speaker = client_speakers(shadow_data)[shadow_data.client[rows]]
        # the attacked clients' numbers of examples (sent in the clear with every reply)
        sizes = np.array([u.num_examples for u in p_updates] or [int(cfg.fl.batch_size)])
        attack = train_feature_space_attack(shadow_data.X[rows], shadow_data.y[rows], shadow_data.client[rows],
                                            shadow_data.client_gender, batch_size=int(cfg.fl.batch_size),
                                            pools=pools, draws=int(fs.draws), l2=float(fs.l2), seed=seed,
                                            speaker=speaker, sizes=sizes, draws_from=draws_from)
        if recovered:
            scores = np.array([attack.p_female(r.inputs, r.labels) for r in recovered])
            ev[f"feature-space{suffix}"] = evaluate_attack(attack.scorer(recovered), scores, clients, p_labels,
                                                           trials=trials, pool_rounds=pools, seed=seed)
            # the same classifier, its threshold set between the two clusters of the attacked clients' scores
            adaptive = attack.adapted(scores)
            ev[f"feature-space-adaptive{suffix}"] = evaluate_attack(
                adaptive.scorer(recovered), np.array([adaptive.p_female(r.inputs, r.labels) for r in recovered]),
                clients, p_labels, trials=trials, pool_rounds=pools, seed=seed)
        for name, inverted in (aggregates or {}).items():
            if not inverted:  # no round whose outcome is recorded (e.g. a one-round run)
                continue
            round_scores = {a.round: attack.p_female(r.inputs, r.labels) for a, r in inverted}
            # every private client that took part (SecAgg+: as the rounds' members say)
            cl = sorted({u.client for u in p_updates} or {p for a, _ in inverted for p in a.clients})
            gender = np.array([int(client_gender[c] == "F") for c in cl])
            p = differencing_scores(round_scores, {a.round: a.clients for a, _ in inverted}, cl)
            ev[f"{name}{suffix}"] = evaluate_attack(lambda idx, p=p: float(p[idx].mean()), p, np.array(cl) + fold * FOLD_KEY,
                                                    gender, trials=1, seed=seed)
    return FoldAttacks(ev, layers, weights, history)


def invert_aggregates(cfg: DictConfig, store: UpdateStore, data: FederatedData, seed: int,
                      members: dict[int, tuple[int, ...]] | None = None, server_view: bool = False) -> tuple[list, dict]:
    """The observer of aggregates' first step: the batch behind each round's sum, inverted at the round's
    global model; reported with what was recovered and each round's true share of female clients.
    ``members`` and ``server_view``: see :func:`attacks.inference.aggregate.round_aggregates` (SecAgg+)."""
    t0 = time.perf_counter()
    aggs = round_aggregates(store, int(cfg.fl.batch_size), members, server_view)
    fs = cfg.attack.feature_space
    draws = int(fs.ransac_draws if fs.get("aggregate_ransac_draws") is None else fs.aggregate_ransac_draws)
    inverted = invert_all((InversionJob(a.update, a.params, a.batch_size, (seed + 7, a.round)) for a in aggs),
                          float(cfg.model.dropout), ransac_draws=draws, stall=_stall(cfg), give_up=_give_up(cfg),
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


def client_signal(data: FederatedData, updates: list, recovered: list[Recovered], fold: int) -> dict:
    """Per attacked client: the emotion-conditional means of its true training rows and of the
    utterances recovered from all its updates (their union), its label (1 = female) and its
    speaker, for :func:`signal_probes`."""
    by_client: dict[int, list[Recovered]] = {}
    for u, r in zip(updates, recovered):
        by_client.setdefault(u.client, []).append(r)
    true, rec, label, speaker = [], [], [], []
    keys = client_speakers(data)
    for c, rs in sorted(by_client.items()):
        X, y = data.client_rows(c, TRAIN)
        Xr, yr = pooled(rs)
        true.append(emotion_means(X, y))
        rec.append(emotion_means(Xr, yr) if len(Xr) else np.zeros_like(true[-1]))
        label.append(int(data.client_gender[c] == "F"))
        speaker.append(keys[c])
    return {"true": np.array(true), "recovered": np.array(rec), "label": np.array(label),
            "speaker": np.array(speaker), "fold": np.full(len(label), fold)}


def signal_probes(signals: list[dict], seed: int = 0) -> dict:
    """Where the gender signal is kept or lost, before the attacker's classifier: a linear probe
    cross-validated over the attacked clients themselves (each speaker in one fold only), on their
    true statistics, on the statistics the inversion recovered, and on the true ones with the
    speakers' genders shuffled (its chance level). Balanced accuracy."""
    from fed_ser.experiments.calibration import probe

    S = {k: np.concatenate([s[k] for s in signals]) for k in signals[0]}
    speakers = np.unique(S["speaker"])
    own = {sp: S["label"][S["speaker"] == sp][0] for sp in speakers}
    flip = dict(zip(speakers.tolist(), np.random.default_rng(seed).permutation([own[sp] for sp in speakers])))
    shuffled = np.array([flip[sp] for sp in S["speaker"].tolist()])
    return {"probe_true": probe(S["true"], S["label"], S["speaker"]),
            "probe_recovered": probe(S["recovered"], S["label"], S["speaker"]),
            "probe_true_shuffled": probe(S["true"], shuffled, S["speaker"]),
            "clients": int(len(S["label"])), "speakers": int(len(speakers))}


def run_fold(cfg: DictConfig, fold: int, out: Path, trained: dict | None = None) -> tuple[dict, FoldAttacks]:
    """Private training, shadow training, attack training and evaluation for one fold; ``trained``: the
    attacks the cell's earlier folds trained (see :func:`_run_attacks`)."""
    t0 = time.perf_counter()
    tm = threat_model(cfg, fold)
    secagg = bool(cfg.fl.secagg)
    if secagg and not (cfg.attack.feature_space.enabled and cfg.attack.aggregate_observer):
        raise ConfigError("fl.secagg=true leaves the server the round sums only: the attack needs "
                          "attack.feature_space.enabled=true and attack.aggregate_observer=true")
    priv_fl = train_recorded(cfg, tm.private_data, out / f"fold{fold}", "private", str(cfg.private_engine))
    shadow_fl = None
    if not secagg:  # under SecAgg+ no update reaches the server: no attack on updates to train on shadow ones
        shadow_cfg = cfg
        if str(cfg.shadow.engine) != "flower" and str(cfg.flower_dp.mode) != "none":
            # Flower's DP runs inside Flower only: the attacker's in-process shadow federations train without it
            # (the feature-space attack needs no shadow federation; the CNN and profile attacks are then the weaker)
            shadow_cfg = OmegaConf.merge(cfg, {"flower_dp": {"mode": "none"}})
        shadow_fl = train_recorded(shadow_cfg, tm.shadow_data, out / f"fold{shadow_fold(cfg, fold)}", "shadow",
                                   str(cfg.shadow.engine))
    t_fl = time.perf_counter() - t0

    shadow_store, s_updates, s_labels = None, [], np.zeros(0, dtype=np.int64)
    if shadow_fl is not None:
        shadow_store = UpdateStore(Path(shadow_fl["dir"]) / "updates")
        s_updates, s_labels = labelled_updates(shadow_store, FederatedData.load(tm.shadow_data).client_gender)
    priv_store = UpdateStore(Path(priv_fl["dir"]) / "updates")
    p_updates, p_labels = labelled_updates(priv_store, FederatedData.load(tm.private_data).client_gender)
    seed = int(cfg.attack.seed)
    control = bool(cfg.attack.control)
    shadow_data, priv_data = FederatedData.load(tm.shadow_data), FederatedData.load(tm.private_data)
    recovered, inversion = None, None
    if cfg.attack.feature_space.enabled and p_updates:
        t_inv = time.perf_counter()
        print(f"[attack] fold {fold}: inverting {len(p_updates)} private updates", flush=True)
        recovered = recover_batches(cfg, priv_store, p_updates, seed)
        inversion = {**_recovery_report(recovered, p_updates, priv_data), "seconds": time.perf_counter() - t_inv}
        print(f"[attack] fold {fold}: recovered {inversion['recovered']} of {inversion['utterances_in_batches']} "
              f"utterances ({inversion['complete_updates']} of {inversion['updates']} batches whole, "
              f"{inversion['share_exact']:.1%} exact) in {inversion['seconds']:.0f} s", flush=True)
    views, aggregate = {}, None  # evaluation name -> the round sums that observer inverted
    if cfg.attack.feature_space.enabled and cfg.attack.aggregate_observer:
        members = {r["round"]: tuple(r.get("clients", ())) for r in priv_fl["rounds"]} if secagg else None
        views["aggregate-observer"], aggregate = invert_aggregates(cfg, priv_store, priv_data, seed, members)
        print(f"[attack] fold {fold}: observer of aggregates: recovered {aggregate['recovered']} of "
              f"{aggregate['utterances_in_rounds']} utterances from {aggregate['rounds']} round sums "
              f"in {aggregate['seconds']:.0f} s", flush=True)
        if secagg:  # the server's own view: the sums it unmasks, before any noise it adds (none: the same sums)
            views[SERVER_SUMS] = views["aggregate-observer"]
            if str(cfg.flower_dp.mode) == "client-fixed":  # the only mode that adds noise after unmasking
                views[SERVER_SUMS], aggregate["server"] = invert_aggregates(cfg, priv_store, priv_data, seed, members,
                                                                            server_view=True)
    cnn = bool(s_updates)  # the CNN trains on shadow updates (none under SecAgg+)
    shadow_for_attack = _shuffled_client_genders(shadow_data, seed) if control else shadow_data
    attacks = _run_attacks(cfg, fold, shadow_store, s_updates,
                           _shuffled_genders(s_updates, s_labels, seed) if control else s_labels,
                           priv_store, p_updates, p_labels, shadow_data=shadow_for_attack, recovered=recovered,
                           cnn=cnn, aggregates=views, client_gender=priv_data.client_gender, trained=trained)
    attacks.inversion, attacks.aggregate = inversion, aggregate
    if recovered is not None and not control:
        attacks.signal = client_signal(priv_data, p_updates, recovered, fold)
    if bool(cfg.attack.with_control) and not control:
        # the CNN's control is one permutation (it is costly to train); the cheap attacks average
        # attack.control_permutations of them, so that a few shadow speakers do not make it a coin toss
        runs = [_run_attacks(cfg, fold, shadow_store, s_updates, _shuffled_genders(s_updates, s_labels, seed + i),
                             priv_store, p_updates, p_labels, suffix="-control",
                             shadow_data=_shuffled_client_genders(shadow_data, seed + i), recovered=recovered, cnn=cnn and i == 0,
                             aggregates=views, client_gender=priv_data.client_gender, trained=trained)
                for i in range(_control_permutations(cfg))]
        for name in runs[0].evaluations:
            attacks.evaluations[name] = average_evaluations([r.evaluations[name] for r in runs if name in r.evaluations])
    result = {
        "fold": fold, "private": tm.private, "shadow": list(tm.shadow), "shadow_mode": tm.mode,
        "shadow_fold": shadow_fold(cfg, fold),
        "threat_model": tm.describe(), "algorithm": cfg.fl.algorithm, "features": cfg.features.name, "control": control,
        "ser": {"test_acc": priv_fl["selected"]["test_acc"], "test_uar": priv_fl["selected"]["test_uar"],
                "final_test_uar": priv_fl["final"]["test_uar"]},
        "shadow_ser_uar": shadow_fl["final"]["test_uar"] if shadow_fl else None, "secagg": secagg,
        "private_clients": int(len(np.unique([u.client for u in p_updates]))), "private_updates": len(p_updates),
        "shadow_clients": int(len(np.unique([u.client for u in s_updates]))), "shadow_updates": len(s_updates),
        "attacks": {name: summarize([e]) for name, e in attacks.evaluations.items()},
        "asr_per_layer": attacks.per_layer,
        "fusion_weights": attacks.fusion_weights,
        "defence": {"dp_mode": str(cfg.dp.mode), "dp_epsilon": float(cfg.dp.epsilon), "dp_clip": float(cfg.dp.clip),
                    "dp_calibrate": str(cfg.dp.calibrate), "dropout": float(cfg.model.dropout),
                    "spent_epsilon_max": (priv_fl.get("privacy") or {}).get("spent_epsilon_max"),
                    "flower_dp_mode": str(cfg.flower_dp.mode), "flower_dp_noise": float(cfg.flower_dp.noise_multiplier),
                    "flower_dp_clip": float(cfg.flower_dp.clip), "flower_dp_epsilon": float(cfg.flower_dp.epsilon),
                    "privacy": {k: v for k, v in (priv_fl.get("privacy") or {}).items() if k != "clients"}},
        "seconds_per_round": seconds_per_round(priv_fl),
        "inversion": attacks.inversion,
        "aggregate": attacks.aggregate,
        "attack_history": attacks.history,
        "seconds": {"fl": t_fl, "total": time.perf_counter() - t0},
    }
    for name, m in result["attacks"].items():
        lo, hi = m["asr_ci"]
        print(f"[attack] fold {fold}: {name} ASR {m['asr']:.3f} [{lo:.3f}, {hi:.3f}] AUC {_fmt(m['auc'])} "
              f"over {m['clients']} clients; pooled " + " ".join(f"k={k}: {v:.3f}" for k, v in m["asr_pooled"].items()),
              flush=True)
    return result, attacks


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_experiment(cfg: DictConfig) -> dict:
    """All configured folds of one cell, with its report; metrics pooled over the folds' clients."""
    check_threat_model(cfg)  # a wrong value stops before the cell's folder exists
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-control" if cfg.attack.control else ""  # the control shares the FL runs, not the report
    atomic_write_text(out / f"config{suffix}.yaml", OmegaConf.to_yaml(cfg))
    t0 = time.perf_counter()
    folds, evaluations, signals, trained = [], {}, [], {}
    for fold in cfg.folds:
        result, attacks = run_fold(cfg, int(fold), out, trained)
        folds.append(result)
        if attacks.signal is not None:
            signals.append(attacks.signal)
        for name, e in attacks.evaluations.items():
            evaluations.setdefault(name, []).append(e)
        atomic_write_json(out / f"results{suffix}.json", {"folds": folds})  # partial results survive a crash
    first = folds[0]
    summary = {
        "private": str(cfg.private), "private_corpus": first["private"], "shadow": first["shadow"],
        "shadow_mode": first["shadow_mode"], "threat_model": first["threat_model"], "algorithm": cfg.fl.algorithm,
        "features": cfg.features.name, "control": bool(cfg.attack.control), "folds": folds,
        "wall_seconds": time.perf_counter() - t0, "defence": first["defence"],
        "ser": {"uar": float(np.mean([f["ser"]["test_uar"] for f in folds])),
                "acc": float(np.mean([f["ser"]["test_acc"] for f in folds]))},
        "attacks": {name: summarize(evs, seed=int(cfg.attack.seed)) for name, evs in evaluations.items()},
        "asr_per_layer": {l: float(np.mean([f["asr_per_layer"][l] for f in folds])) for l in first["asr_per_layer"]},
    }
    if signals:
        summary["signal"] = signal_probes(signals, int(cfg.attack.seed))
        sig = summary["signal"]
        print(f"[attack] signal, probe cross-validated over the {sig['clients']} attacked clients (balanced accuracy): "
              f"true statistics {sig['probe_true']:.3f}, recovered {sig['probe_recovered']:.3f}, "
              f"shuffled genders {sig['probe_true_shuffled']:.3f}", flush=True)
    atomic_write_json(out / f"results{suffix}.json", summary)
    write_run_report(out, summary, suffix)
    print(f"[fed-ser] report: {out / f'report{suffix}.md'}  figures: {out / f'asr{suffix}.png'}, "
          f"{out / f'roc{suffix}.png'}  data: {out / f'results{suffix}.csv'}", flush=True)
    return summary


def collect_summaries(grid_dir: Path) -> list[dict]:
    """The finished cell summaries (``*/results.json`` with pooled attack metrics) under ``grid_dir``."""
    found = []
    for path in sorted(Path(grid_dir).glob("*/results.json")):
        summary = json.loads(path.read_text())
        if "attacks" in summary and "ser" in summary:
            found.append(summary)
    return found


@console
def main(argv: list[str] | None = None, config_name: str = "experiment") -> None:
    """Console script ``fed-ser-experiment [-m] key=value ...``."""
    multirun, runs = expand_overrides(list(sys.argv[1:] if argv is None else argv))
    summaries = []
    for i, overrides in enumerate(runs, 1):
        if multirun:
            print(f"[fed-ser] multirun {i}/{len(runs)}: {' '.join(overrides)}", flush=True)
        cfg = load_config(overrides, config_name)
        summaries.append(run_experiment(cfg))
    grid_dir = Path(load_config(runs[0], config_name).grid_dir)
    if config_name == "defense":  # every finished cell under grid_dir, so separate sweeps add up
        write_defense_report(grid_dir, collect_summaries(grid_dir) or summaries)
        print(f"[fed-ser] defence report: {grid_dir / 'defense_report.md'}")
    elif multirun:  # every finished cell under grid_dir too, so cells run one at a time add up
        write_grid_report(grid_dir, collect_summaries(grid_dir) or summaries)
        print(f"[fed-ser] grid report: {grid_dir / 'grid_report.md'}")


def defense_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-defense -m dp=sample dp.epsilon=1,5,10,...`` (conf/defense.yaml)."""
    main(argv, "defense")


if __name__ == "__main__":
    main()
