"""From corpus to prepared federated data set: generate/load, extract, z-normalise, partition.

This is the data -> features -> clients half of the pipeline, driven by the Hydra config
(``data.*``, ``dataset.*``, ``features.*``, ``fold``). Failures (corrupt audio, NaN features,
label problems) are listed in ``<prepared>.failures.csv`` and on stderr; the rest proceeds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fed_ser.data.corpora import load_corpus
from fed_ser.settings import ConfigError
from fed_ser.data.federated import build_federated
from fed_ser.data.synthetic import ensure_corpus
from fed_ser.features.extract import extract_features
from fed_ser.features.normalize import speaker_znorm
from fed_ser.io import atomic_write_text

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


def _upstream_version(features: DictConfig) -> dict:
    """For an s3prl upstream, the checkpoint's content hash (part of the prepared data's key)."""
    from fed_ser.features.ssl import UPSTREAMS, S3prlUpstream

    if str(features.name) not in UPSTREAMS:
        return {}
    return {"upstream": S3prlUpstream(str(features.name), features.get("ckpt") or None, load=False).version}


def corpus_root(cfg: DictConfig, corpus: str) -> Path:
    roots = cfg.data.get("roots") or {}
    return Path(roots.get(corpus) or Path(cfg.data.root) / corpus)


def corpus_manifest(cfg: DictConfig, corpus: str):
    """``load_corpus`` on the corpus' root, generating the synthetic corpus there first if configured."""
    root = corpus_root(cfg, corpus)
    if cfg.data.synthetic:
        if not float(cfg.data.gender_style) >= 0:
            raise ConfigError(f"data.gender_style: must be >= 0, got {cfg.data.gender_style}")
        ensure_corpus(root, corpus, scale=float(cfg.data.scale), seed=int(cfg.data.seed),
                      gender_style=float(cfg.data.gender_style))
    return load_corpus(corpus, root)


def corpus_features(cfg: DictConfig, corpus: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and per-speaker z-normalised features of one corpus (rows that failed dropped)."""
    root, (manifest, issues) = corpus_root(cfg, corpus), corpus_manifest(cfg, corpus)
    problems = [(i.path, i.reason) for i in issues]
    X, ok, failures = extract_features(manifest.path.tolist(), feature_factory(cfg.features), cfg.data.cache,
                                       workers=int(cfg.data.workers) or None, desc=f"{cfg.features.name}:{corpus}")
    problems += [(f.path, f.reason) for f in failures]
    if problems:
        print(f"[fed-ser] {corpus}: {len(problems)} entries skipped:", file=sys.stderr)
        for path, reason in problems[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
    manifest = manifest[ok].reset_index(drop=True)
    if manifest.empty:
        first = f" (first: {problems[0][0]}: {problems[0][1]})" if problems else ""
        raise RuntimeError(f"{corpus}: no usable utterances under {root}{first}")
    manifest.attrs["problems"] = problems
    return manifest, speaker_znorm(X[ok], manifest.speaker.to_numpy())


def extract_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-extract features=<set> [corpora=[...]] [limit=N] key=value ...``: fill
    the feature cache (the separate extraction step; s3prl upstreams run it in ``.venv-s3prl``)."""
    from fed_ser.cli import load_config

    cfg = load_config(list(sys.argv[1:] if argv is None else argv), "extract")
    if int(cfg.limit) < 0:
        raise ValueError(f"limit: must be >= 0 (0: every utterance), got {cfg.limit}")
    factory, failed = feature_factory(cfg.features), 0
    for corpus in cfg.corpora:
        paths = corpus_manifest(cfg, str(corpus))[0].path.tolist()[: int(cfg.limit) or None]
        _, ok, failures = extract_features(paths, factory, cfg.data.cache, workers=int(cfg.data.workers) or None,
                                           desc=f"{cfg.features.name}:{corpus}")
        for f in failures[:20]:
            print(f"  {f.path}: {f.reason}", file=sys.stderr)
        failed += len(failures)
        print(f"[fed-ser] {corpus}: {int(ok.sum())} of {len(paths)} utterances' {cfg.features.name} features "
              f"in {cfg.data.cache}", flush=True)
    if failed:
        sys.exit(f"[fed-ser] {failed} utterances failed")


def prepare(cfg: DictConfig, corpora: list[str], fold: int, train_share: float = 1.0, tag: str = "") -> Path:
    """Build (or reuse) the prepared ``.npz`` for ``corpora`` and ``fold``; return its path."""
    shards = {c: int(cfg.shards.get(c, 1)) for c in corpora}
    key = json.dumps(dict(corpora=sorted(corpora), fold=fold, share=train_share, shards=shards,
                          features=cfg.features.name, **_upstream_version(cfg.features), scale=float(cfg.data.scale), data_seed=int(cfg.data.seed), gender_style=float(cfg.data.gender_style),
                          synthetic=bool(cfg.data.synthetic), n_folds=int(cfg.n_folds), seed=int(cfg.seed),
                          roots=[str(corpus_root(cfg, c)) for c in sorted(corpora)]), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = Path(cfg.data.prepared_dir) / f"{tag or '+'.join(sorted(corpora))}-{cfg.features.name}-fold{fold}-{digest}.npz"
    if path.exists():
        return path
    parts = [corpus_features(cfg, c) for c in sorted(corpora)]
    manifest = pd.concat([m for m, _ in parts], ignore_index=True)
    Z = np.concatenate([z for _, z in parts])
    data = build_federated(manifest, Z, fold, shards, int(cfg.n_folds), train_share, int(cfg.seed))
    data.save(path)
    problems = [p for m, _ in parts for p in m.attrs.get("problems", [])]
    if problems:
        atomic_write_text(path.with_suffix(".failures.csv"),
                          "path,reason\n" + "".join(f'"{p}","{r}"\n' for p, r in problems))
    return path
