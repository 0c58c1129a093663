"""Synthetic realism against real recordings: is the synthetic corpora's gender cue the real one?

Per-speaker z-normalisation leaves one gender cue in a client's data: *how* each emotion moves the
features differs between women and men. The attacks read it from the client's emotion-conditional
means. An attacker trained on synthetic speech can only transfer to a real corpus if the synthetic
voice model puts that cue where real voices do. This report sets the two side by side:

* the **gender pattern** of each corpus: per emotion, the mean z-normalised Emo-Base functionals of
  the women's clients minus the men's (988 numbers an emotion); its correlation between the real
  corpus and the synthetic corpora, per emotion and for the emotion-by-gender interaction (the
  pattern minus its mean over emotions: what z-normalisation cannot remove);
* the **probes**: a linear probe on the clients' emotion-conditional means, cross-validated with
  speakers kept apart, within the real corpus, within the synthetic corpora, and with shuffled
  genders (chance);
* the **transfer**: the probe fitted on the synthetic clients and applied to the real ones
  (balanced accuracy and AUC): the ceiling of ``shadow.mode=synthetic`` for these statistics;
* the **prosody** (Emo-Base features only, before normalisation): per gender and emotion, how far
  the speakers' mean F0 (``F0env_sma_amean``, semitones) and loudest frame (``pcm_intensity_sma_max``,
  dB) move from their neutral speech: the measurements the ``emodb`` voice (``data.voice``,
  :mod:`fed_ser.data.voice`) was set from.

    fed-ser-calibrate private=emodb data.roots.emodb=../shared/data/emodb

Writes ``calibration.json``, ``calibration.md`` and ``calibration.png`` to ``out_dir``
(``runs/calibration/<private>``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.inference.feature_space import emotion_means
from fed_ser.data.corpora import EMOTIONS
from fed_ser.data.federated import FederatedData
from fed_ser.experiments.config import console, load_config
from fed_ser.experiments.prepare import (
    CALIBRATION_CORPUS,
    calibration_speakers,
    corpus_manifest,
    corpus_source,
    feature_factory,
    prepare,
)
from fed_ser.features.extract import extract_features
from fed_ser.features.prosody import PROSODY, prosody_changes
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.run.settings import ConfigError


def gender_pattern(data: FederatedData) -> np.ndarray:
    """(emotions, features): per emotion, the women's clients' mean minus the men's (NaN where a
    gender has no utterance of that emotion)."""
    female = np.isin(data.client, np.flatnonzero(data.client_gender == "F"))
    male = np.isin(data.client, np.flatnonzero(data.client_gender == "M"))  # test rows (client -1) are neither
    out = np.full((len(EMOTIONS), data.X.shape[1]), np.nan)
    for e in range(len(EMOTIONS)):
        f, m = (data.y == e) & female, (data.y == e) & male
        if f.any() and m.any():
            out[e] = data.X[f].mean(0) - data.X[m].mean(0)
    return out


def client_statistics(data: FederatedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each client's emotion-conditional means (all its rows), its label (1 = female) and its speaker."""
    clients = np.unique(data.client[data.client >= 0])
    S = np.array([emotion_means(data.X[data.client == c], data.y[data.client == c], len(EMOTIONS)) for c in clients])
    return S, (data.client_gender[clients] == "F").astype(int), data.client_speaker[clients]


def _probe_model():
    # balanced classes: with speakers held out, a training fold's gender mix is the opposite of its
    # test fold's, and an unweighted, strongly regularised probe would predict that mix (below chance)
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))


def probe(S: np.ndarray, labels: np.ndarray, speakers: np.ndarray, folds: int = 5) -> float:
    """Balanced accuracy of the linear probe, cross-validated with each speaker in one fold only."""
    k = min(folds, len(np.unique(speakers)))
    if k < 2 or len(np.unique(labels)) < 2:
        return float("nan")
    pred = np.zeros_like(labels)
    for tr, te in GroupKFold(n_splits=k).split(S, labels, speakers):
        if len(np.unique(labels[tr])) < 2:
            pred[te] = labels[tr][0]
            continue
        pred[te] = _probe_model().fit(S[tr], labels[tr]).predict(S[te])
    return float(balanced_accuracy_score(labels, pred))


def transfer(S_from: np.ndarray, l_from: np.ndarray, S_to: np.ndarray, l_to: np.ndarray) -> dict:
    """The probe fitted on one corpus' clients, scored on another's."""
    model = _probe_model().fit(S_from, l_from)
    p = model.predict_proba(S_to)[:, 1]
    auc = float(roc_auc_score(l_to, p)) if len(np.unique(l_to)) == 2 else None
    return {"balanced_accuracy": float(balanced_accuracy_score(l_to, (p > 0.5).astype(int))), "auc": auc}


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else None


def compare(real: FederatedData, synthetic: FederatedData, seed: int = 0) -> dict:
    """The calibration figures of ``synthetic`` against ``real`` (see the module docstring)."""
    pr, ps = gender_pattern(real), gender_pattern(synthetic)
    inter = lambda p: p - np.nanmean(p, axis=0, keepdims=True)
    Sr, lr, gr = client_statistics(real)
    Ss, ls, gs = client_statistics(synthetic)
    rng = np.random.default_rng(seed)
    speakers = np.unique(gr)  # genders shuffled across speakers, each speaker's clients together
    flip = dict(zip(speakers, rng.permutation([lr[gr == s][0] for s in speakers])))
    shuffled = np.array([flip[s] for s in gr])
    return {
        "pattern_correlation": {e: _corr(pr[i], ps[i]) for i, e in enumerate(EMOTIONS)},
        "pattern_correlation_all": _corr(pr.reshape(-1), ps.reshape(-1)),
        "interaction_correlation": _corr(inter(pr).reshape(-1), inter(ps).reshape(-1)),
        "pattern_size": {"real": {e: float(np.nanmean(np.abs(pr[i]))) for i, e in enumerate(EMOTIONS)},
                         "synthetic": {e: float(np.nanmean(np.abs(ps[i]))) for i, e in enumerate(EMOTIONS)}},
        "probe": {"real": probe(Sr, lr, gr), "synthetic": probe(Ss, ls, gs), "real_shuffled": probe(Sr, shuffled, gr)},
        "transfer_synthetic_to_real": transfer(Ss, ls, Sr, lr),
        "clients": {"real": len(lr), "synthetic": len(ls)},
        "speakers": {"real": len(np.unique(gr)), "synthetic": len(np.unique(gs))},
        "_patterns": (pr, ps),
    }


def _figure(path: Path, pr: np.ndarray, ps: np.ndarray, corr: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EMOTIONS), figsize=(4 * len(EMOTIONS), 4))
    for i, (ax, e) in enumerate(zip(axes, EMOTIONS)):
        ax.scatter(pr[i], ps[i], s=4, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        r = corr[e]
        ax.set_title(f"{e}: r = {r:.2f}" if r is not None else e)
        ax.set_xlabel("real: women - men (z)")
        if i == 0:
            ax.set_ylabel("synthetic: women - men (z)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(real: str, synthetic: list[str], r: dict) -> str:
    fmt = lambda x: "n/a" if x is None or x != x else f"{x:.2f}"
    rows = "\n".join(f"| {e} | {fmt(r['pattern_correlation'][e])} | {fmt(r['pattern_size']['real'][e])} | "
                     f"{fmt(r['pattern_size']['synthetic'][e])} |" for e in EMOTIONS)
    t = r["transfer_synthetic_to_real"]
    return (f"# Synthetic realism: {', '.join(synthetic)} (voice {r.get('voice', 'designed')}) against {real}\n\n"
            f"![gender patterns](calibration.png)\n\n"
            f"Gender pattern (women's minus men's mean z-normalised functionals, per emotion), real vs synthetic:\n\n"
            f"| emotion | correlation | mean size, real | mean size, synthetic |\n|---|---|---|---|\n{rows}\n\n"
            f"All emotions: {fmt(r['pattern_correlation_all'])}; emotion-by-gender interaction: "
            f"{fmt(r['interaction_correlation'])}.\n\n"
            f"Linear probe on clients' emotion-conditional means, speakers kept apart (balanced accuracy): "
            f"real {fmt(r['probe']['real'])} ({r['clients']['real']} clients, {r['speakers']['real']} speakers), "
            f"synthetic {fmt(r['probe']['synthetic'])}, real with shuffled genders {fmt(r['probe']['real_shuffled'])}.\n\n"
            f"Transfer, probe fitted on the synthetic clients, applied to the real ones: balanced accuracy "
            f"{fmt(t['balanced_accuracy'])}, AUC {fmt(t['auc'])}.\n")


def _raw_prosody(cfg: DictConfig, sources: list) -> dict:
    """:func:`prosody_changes` of these corpora together, from their cached raw Emo-Base features."""
    from fed_ser.features.emobase import feature_names

    emotion, speaker, gender, X = [], [], [], []
    for src in sources:
        manifest, _ = corpus_manifest(cfg, src)
        raw, ok, _ = extract_features(manifest.path.tolist(), feature_factory(cfg.features), cfg.data.cache,
                                      workers=int(cfg.data.workers) or None, desc=f"prosody:{src.label}")
        manifest = manifest[ok]
        emotion.append(manifest.emotion.to_numpy(str))
        speaker.append((src.corpus + "/" + manifest.speaker.astype(str)).to_numpy(str))
        gender.append(manifest.gender.to_numpy(str))
        X.append(raw[ok])
    return prosody_changes(np.concatenate(emotion), np.concatenate(speaker), np.concatenate(gender),
                           np.concatenate(X), feature_names())


def _prosody_markdown(real: str, p: dict) -> str:
    if not p:
        return ""
    cell = lambda m: "n/a" if m["mean"] is None else f"{m['mean']:+.1f}" + (f" ± {m['se']:.1f}" if m["se"] else "")
    lines = ["", "Prosody, change from the speakers' neutral speech (mean ± s.e. over speakers; raw Emo-Base):", "",
             "| measure | gender | " + " | ".join(f"{e}: {real} | {e}: synthetic" for e in EMOTIONS[1:]) + " |",
             "|---|---|" + "---|---|" * (len(EMOTIONS) - 1)]
    for measure in PROSODY:
        for g in ("F", "M"):
            lines.append(f"| {measure} | {g} | " + " | ".join(
                f"{cell(p['real'][measure][g][e])} | {cell(p['synthetic'][measure][g][e])}" for e in EMOTIONS[1:]) + " |")
    return "\n".join(lines) + "\n"


def calibrate(cfg: DictConfig) -> dict:
    """Prepare the real private corpus and the synthetic corpora (fold 0's training speakers) and compare them."""
    private = str(cfg.private)
    src = corpus_source(cfg, private)
    if src.synthetic:
        raise ConfigError(f"data.roots.{private}: not set; the calibration compares a real corpus with the synthetic ones")
    names = [str(c) for c in cfg.calibration.synthetic]
    calibrated = str(cfg.data.voice) == CALIBRATION_CORPUS and private == CALIBRATION_CORPUS
    # a voice calibrated on fold 0's attacker speakers is compared on the other (private) speakers only
    real = FederatedData.load(prepare(cfg, [src], 0, speaker_role="private", tag=f"{private}-private") if calibrated
                              else prepare(cfg, [src], 0))
    synth = FederatedData.load(prepare(cfg, [corpus_source(cfg, c, synthetic=True, fold=0) for c in names], 0,
                                       tag="calibration-" + "+".join(names)))
    result = compare(real, synth, int(cfg.seed))
    if str(cfg.features.name) == "emobase":
        result["prosody"] = {"real": _raw_prosody(cfg, [src]),
                             "synthetic": _raw_prosody(cfg, [corpus_source(cfg, c, synthetic=True, fold=0) for c in names])}
    result["voice"] = str(cfg.data.voice) if str(cfg.data.voice) != CALIBRATION_CORPUS else calibration_speakers(cfg, 0)[1]
    pr, ps = result.pop("_patterns")
    out = Path(cfg.calibration.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{c} (synthetic)" for c in names]
    atomic_write_json(out / "calibration.json", {"real": src.label, "synthetic": labels, **result})
    atomic_write_text(out / "calibration.md", _markdown(src.label, labels, result)
                      + _prosody_markdown(src.label, result.get("prosody")))
    _figure(out / "calibration.png", pr, ps, result["pattern_correlation"])
    return result


@console
def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-calibrate private=emodb data.roots.emodb=PATH`` (conf/calibrate.yaml)."""
    cfg = load_config(list(sys.argv[1:] if argv is None else argv), "calibrate")
    calibrate(cfg)
    print(f"[fed-ser] calibration report: {Path(cfg.calibration.out_dir) / 'calibration.md'}")
    print(Path(cfg.calibration.out_dir, "calibration.md").read_text())


if __name__ == "__main__":
    main()
