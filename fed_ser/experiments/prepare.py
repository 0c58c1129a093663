"""From corpus to prepared federated data set: generate/load, extract, z-normalise, partition.

This is the data -> features -> clients half of the pipeline, driven by the Hydra config
(``data.*``, ``dataset.*``, ``features.*``, ``fold``). Failures (corrupt audio, NaN features,
label problems) are listed in ``<prepared>.failures.csv`` and on stderr; the rest proceeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fed_ser.data.corpora import LOADERS, load_corpus
from fed_ser.data.federated import build_federated, corpus_labels, fold_roles
from fed_ser.data.partition import MIN_CLIENT_ROWS, too_small_speakers
from fed_ser.data.synthetic import CORPORA as SYNTHETIC_CORPORA
from fed_ser.data.synthetic import ensure_corpus
from fed_ser.data.voice import CALIBRATED_EMOTIONS, calibrated_spec, check_voice
from fed_ser.experiments.config import load_config
from fed_ser.features.extract import extract_features
from fed_ser.features.normalize import check_norm, client_znorm, speaker_znorm
from fed_ser.features.prosody import prosody_changes
from fed_ser.io import atomic_write_text
from fed_ser.run.settings import ConfigError


def feature_factory(features: DictConfig):
    """The extractor factory for the ``features`` config group (``features.name``)."""
    from fed_ser.features.ssl import UPSTREAMS, UpstreamFactory, checkpoint_path, s3prl_available

    name = str(features.name)
    if name == "emobase":
        from fed_ser.features.emobase import emobase_factory

        return emobase_factory
    if name in UPSTREAMS:  # s3prl: extracted in its own environment; elsewhere read from the cache only
        ckpt = features.get("ckpt") or None
        checkpoint_path(name, ckpt)  # a missing checkpoint stops here, naming the file
        return UpstreamFactory(name, ckpt, load=s3prl_available())
    raise KeyError(f"features.name: unknown feature set {name!r}; available: {['emobase', *UPSTREAMS]}")


def _extractor_version(features: DictConfig) -> dict:
    """The feature extractor's version (openSMILE's; an s3prl checkpoint's content hash): part of the
    prepared data's key, so new features never meet old prepared data."""
    from fed_ser.features.ssl import UPSTREAMS, S3prlUpstream

    if str(features.name) in UPSTREAMS:
        return {"upstream": S3prlUpstream(str(features.name), features.get("ckpt") or None, load=False).version}
    from importlib.metadata import version

    return {"extractor": f"opensmile{version('opensmile')}"}


@dataclass(frozen=True)
class CorpusSource:
    """Where one corpus of a run comes from: a real tree (``data.roots.<corpus>``) or the synthetic twin."""

    corpus: str
    root: Path
    synthetic: bool
    voice: str = "designed"  # synthetic only: the voice it is generated with (a name or a calibrated spec)

    @property
    def label(self) -> str:
        """How reports and the prepared data name it: ``emodb`` or ``iemocap (synthetic)``."""
        return f"{self.corpus} (synthetic)" if self.synthetic else self.corpus


def corpus_source(cfg: DictConfig, corpus: str, synthetic: bool | None = None, fold: int | None = None) -> CorpusSource:
    """The source of ``corpus`` in this run: real where ``data.roots.<corpus>`` is set, else synthetic.

    ``synthetic=True`` asks for the synthetic corpus whatever the roots say (``shadow.mode=synthetic``:
    the attacker has only the synthetic corpora). With ``data.synthetic=false`` nothing is generated
    and every corpus needs its root. A synthetic corpus's voice is :func:`resolve_voice`'s for ``fold``.
    Problems raise :class:`ConfigError` naming the key.
    """
    if corpus not in LOADERS:
        raise ConfigError(f"unknown corpus {corpus!r}; expected one of {sorted(LOADERS)}")
    given = (cfg.data.get("roots") or {}).get(corpus)
    if synthetic or (synthetic is None and not given):
        if synthetic is None and not cfg.data.synthetic:
            raise ConfigError(f"data.roots.{corpus}: not set, and data.synthetic=false forbids generating the corpus")
        if corpus not in SYNTHETIC_CORPORA:
            raise ConfigError(f"data.roots.{corpus}: not set, and a {corpus} corpus cannot be generated "
                              "(point it at your recordings)")
        if not float(cfg.data.gender_style) >= 0:
            raise ConfigError(f"data.gender_style: must be >= 0, got {cfg.data.gender_style}")
        voice = resolve_voice(cfg, fold)
        folder = corpus if voice == "designed" else f"{corpus}-{hashlib.sha256(voice.encode()).hexdigest()[:8]}"
        return CorpusSource(corpus, Path(cfg.data.root) / folder, True, voice)
    root = Path(str(given)).expanduser()
    if not root.exists():
        raise ConfigError(f"data.roots.{corpus}: {root} does not exist")
    return CorpusSource(corpus, root, False)


#: ``data.voice=emodb``: the real corpus a calibrated voice is measured on.
CALIBRATION_CORPUS = "emodb"


def resolve_voice(cfg: DictConfig, fold: int | None = None) -> str:
    """The voice the run's synthetic corpora are generated with: ``data.voice`` as given (``designed``, or a
    calibrated spec ``f0:...``), or for ``emodb`` a voice calibrated on real EmoDB speakers that are never
    attacked: the speakers the attacker holds in ``fold`` when the private corpus is EmoDB itself (the
    split of ``shadow.mode=speakers``), every EmoDB speaker otherwise (another corpus than the private one)."""
    voice = str(cfg.data.voice)
    if voice != CALIBRATION_CORPUS:
        try:
            check_voice(voice)
        except ValueError as e:
            raise ConfigError(f"data.voice: {e}") from None
        return voice
    speakers, _ = calibration_speakers(cfg, fold)
    key = (str(cfg.data.roots[CALIBRATION_CORPUS]), str(cfg.data.cache), tuple(sorted(speakers)) if speakers else None)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrated_spec(_measured_f0(cfg, speakers))
    return _CALIBRATED[key]


_CALIBRATED: dict[tuple, str] = {}  # the measurement a process already made (it reads the whole corpus's features)


def calibration_speakers(cfg: DictConfig, fold: int | None) -> tuple[set[str] | None, str]:
    """The EmoDB speakers a calibrated voice is measured on (None: all of them) and how a report says so."""
    given = (cfg.data.get("roots") or {}).get(CALIBRATION_CORPUS)
    if not given:
        raise ConfigError(f"data.voice={CALIBRATION_CORPUS}: the voice is measured on real recordings; set "
                          f"data.roots.{CALIBRATION_CORPUS} to the corpus")
    if str(cfg.get("private", "")) != CALIBRATION_CORPUS:
        return None, f"voice calibrated on every {CALIBRATION_CORPUS} speaker (not the private corpus)"
    if fold is None:
        raise ConfigError(f"data.voice={CALIBRATION_CORPUS} with private={CALIBRATION_CORPUS}: the voice is measured on "
                          "the speakers the attacker holds in each fold; this command has no fold")
    manifest, _ = load_corpus(CALIBRATION_CORPUS, Path(str(given)).expanduser())
    first = dict(zip(manifest.speaker.astype(str), manifest.gender.astype(str)))
    _, held = fold_roles(first, fold, int(cfg.n_folds), int(cfg.seed), float(cfg.shadow.speaker_share))
    return held, f"voice calibrated on the attacker's {CALIBRATION_CORPUS} speakers of fold {fold} ({', '.join(sorted(held))})"


def _measured_f0(cfg: DictConfig, speakers: set[str] | None) -> dict[str, dict[str, float]]:
    """Per gender and emotion, the mean F0 change (semitones against neutral) of ``speakers``' raw Emo-Base rows."""
    from fed_ser.features.emobase import emobase_factory, feature_names

    src = CorpusSource(CALIBRATION_CORPUS, Path(str(cfg.data.roots[CALIBRATION_CORPUS])).expanduser(), False)
    manifest, _ = corpus_manifest(cfg, src)
    raw, ok, _ = extract_features(manifest.path.tolist(), emobase_factory, cfg.data.cache,
                                  workers=int(cfg.data.workers) or None, desc="voice calibration")
    keep = ok & (manifest.speaker.astype(str).isin(speakers).to_numpy() if speakers is not None else True)
    m = manifest[keep]
    changes = prosody_changes(m.emotion.to_numpy(str), m.speaker.to_numpy(str), m.gender.to_numpy(str), raw[keep],
                              feature_names())["f0_semitones"]
    return {g: {e: float(changes[g][e]["mean"]) for e in CALIBRATED_EMOTIONS} for g in ("F", "M")}


def _source_key(cfg: DictConfig, src: CorpusSource) -> dict:
    """What the prepared data of ``src`` depends on, beyond the fold and partition settings."""
    if src.synthetic:
        key = {"corpus": src.corpus, "synthetic": True, "scale": float(cfg.data.scale), "data_seed": int(cfg.data.seed),
               "gender_style": float(cfg.data.gender_style)}
        if src.voice != "designed":  # the designed voice's keys are those from before there was a choice
            key["voice"] = src.voice
        return key
    key = {"corpus": src.corpus, "root": str(src.root.resolve())}
    if src.corpus == "manifest":
        key["emotion_map"] = _emotion_map(cfg)
    return key


def _emotion_map(cfg: DictConfig) -> dict:
    m = (cfg.data.get("manifest") or {}).get("emotion_map") or {}
    return {str(k): (None if v is None else str(v)) for k, v in dict(m).items()}


def corpus_manifest(cfg: DictConfig, src: CorpusSource):
    """``load_corpus`` on the source's root, generating the synthetic corpus there first if it is synthetic.

    The manifest's ``source`` column says ``real`` or ``synthetic``, so that a real corpus and its
    synthetic twin never share a fold assignment or a client table row.
    """
    if src.synthetic:
        ensure_corpus(src.root, src.corpus, scale=float(cfg.data.scale), seed=int(cfg.data.seed),
                      gender_style=float(cfg.data.gender_style), voice=src.voice)
    options = {}
    if src.corpus == "manifest":
        options = {"emotion_map": _emotion_map(cfg),
                   "allow_outside": bool((cfg.data.get("manifest") or {}).get("allow_outside", False))}
    manifest, issues = load_corpus(src.corpus, src.root, **options)
    manifest["source"] = "synthetic" if src.synthetic else "real"
    return manifest, issues


def corpus_features(cfg: DictConfig, src: CorpusSource) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and features of one corpus (rows that failed dropped): z-normalised per speaker under
    ``features.norm=speaker``, as extracted otherwise (``client`` normalises once the clients exist)."""
    manifest, issues = corpus_manifest(cfg, src)
    problems = [(i.path, i.reason) for i in issues]
    X, ok, failures = extract_features(manifest.path.tolist(), feature_factory(cfg.features), cfg.data.cache,
                                       workers=int(cfg.data.workers) or None, desc=f"{cfg.features.name}:{src.label}")
    problems += [(f.path, f.reason) for f in failures]
    if problems:
        print(f"[fed-ser] {src.label}: {len(problems)} entries skipped:", file=sys.stderr)
        for path, reason in problems[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
    manifest = manifest[ok].reset_index(drop=True)
    if manifest.empty:
        first = f" (first: {problems[0][0]}: {problems[0][1]})" if problems else ""
        raise RuntimeError(f"{src.label}: no usable utterances under {src.root}{first}")
    manifest.attrs["problems"] = problems
    norm = check_norm(str(cfg.features.get("norm", "speaker")))
    return manifest, speaker_znorm(X[ok], manifest.speaker.to_numpy()) if norm == "speaker" else X[ok].astype(np.float32)


def extract_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-extract features=<set> [corpora=[...]] [limit=N] key=value ...``: fill
    the feature cache (the separate extraction step; s3prl upstreams run it in ``.venv-s3prl``)."""
    cfg = load_config(list(sys.argv[1:] if argv is None else argv), "extract")
    if int(cfg.limit) < 0:
        raise ValueError(f"limit: must be >= 0 (0: every utterance), got {cfg.limit}")
    factory, failed = feature_factory(cfg.features), 0
    for corpus in cfg.corpora:
        src = corpus_source(cfg, str(corpus))
        paths = corpus_manifest(cfg, src)[0].path.tolist()[: int(cfg.limit) or None]
        _, ok, failures = extract_features(paths, factory, cfg.data.cache, workers=int(cfg.data.workers) or None,
                                           desc=f"{cfg.features.name}:{src.label}")
        for f in failures[:20]:
            print(f"  {f.path}: {f.reason}", file=sys.stderr)
        failed += len(failures)
        print(f"[fed-ser] {corpus}: {int(ok.sum())} of {len(paths)} utterances' {cfg.features.name} features "
              f"in {cfg.data.cache}", flush=True)
    if failed:
        sys.exit(f"[fed-ser] {failed} utterances failed")


def prepare(cfg: DictConfig, corpora: list[str | CorpusSource], fold: int, train_share: float = 1.0, tag: str = "",
            speaker_role: str | None = None) -> Path:
    """Build (or reuse) the prepared ``.npz`` for ``corpora`` and ``fold``; return its path.

    A corpus given by name comes from :func:`corpus_source` (real if ``data.roots.<corpus>`` is
    set, else synthetic). ``speaker_role`` (``private`` / ``attacker``) keeps one side of the
    ``shadow.mode=speakers`` split (``shadow.speaker_share``).
    """
    sources = sorted((c if isinstance(c, CorpusSource) else corpus_source(cfg, c, fold=fold) for c in corpora),
                     key=lambda s: s.label)
    shards = {s.corpus: int(cfg.shards.get(s.corpus, 1)) for s in sources}
    share = float(cfg.shadow.speaker_share) if speaker_role else None
    norm = check_norm(str(cfg.features.get("norm", "speaker")))
    key = json.dumps(dict(format=2, norm=norm, sources=[_source_key(cfg, s) for s in sources], fold=fold, share=train_share, shards=shards,
                          features=cfg.features.name, **_extractor_version(cfg.features), n_folds=int(cfg.n_folds),
                          seed=int(cfg.seed), speaker_role=speaker_role, speaker_share=share), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    name = tag or "+".join(s.corpus + ("-synthetic" if s.synthetic else "") for s in sources)
    path = Path(cfg.data.prepared_dir) / f"{name}-{cfg.features.name}-fold{fold}-{digest}.npz"
    if path.exists():
        return path
    parts = [corpus_features(cfg, s) for s in sources]
    problems = [p for m, _ in parts for p in m.attrs.get("problems", [])]
    parts = [usable_speakers(m, z, shards.get(src.corpus, 1), problems) for (m, z), src in zip(parts, sources)]
    manifest = pd.concat([m for m, _ in parts], ignore_index=True)
    Z = np.concatenate([z for _, z in parts])
    data = build_federated(manifest, Z, fold, shards, int(cfg.n_folds), train_share, int(cfg.seed),
                           speaker_role=speaker_role, attacker_share=share or 0.5)
    if norm == "client":  # each client normalises its own shard; the attacker's virtual clients will do the same
        data.X_raw, data.X = data.X, client_znorm(data.X, data.client, data.speaker)
    if problems:  # written before the data set, so a data set on disk always has its failures beside it
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "reason"])
        writer.writerows(problems)
        atomic_write_text(path.with_suffix(".failures.csv"), buf.getvalue())
    data.save(path)
    return path


def usable_speakers(manifest: pd.DataFrame, Z: np.ndarray, shards: int, problems: list) -> tuple[pd.DataFrame, np.ndarray]:
    """The corpus without the speakers too small for the split (:func:`fed_ser.data.partition.too_small_speakers`),
    each named on one line on stderr and appended to ``problems`` (the data set's failures.csv)."""
    counts = manifest.speaker.astype(str).value_counts().to_dict()
    small = too_small_speakers(counts, shards)
    if not small:
        return manifest, Z
    label = str(corpus_labels(manifest)[0])
    for speaker, n in sorted(small.items()):
        reason = (f"speaker dropped: {n} utterance{'s' * (n != 1)}, fewer than the {MIN_CLIENT_ROWS} a client needs "
                  "(a training and a validation row)")
        print(f"[fed-ser] {label}: speaker {speaker}: {reason}", file=sys.stderr)
        problems.append((f"{label}/{speaker}", reason))
    keep = ~manifest.speaker.astype(str).isin(list(small)).to_numpy()
    if not keep.any():
        raise RuntimeError(f"{label}: every speaker has fewer than {MIN_CLIENT_ROWS} utterances; nothing to federate")
    return manifest[keep].reset_index(drop=True), Z[keep]
