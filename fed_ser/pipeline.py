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
from fed_ser.data.federated import build_federated
from fed_ser.data.synthetic import ensure_corpus
from fed_ser.features.extract import extract_features
from fed_ser.features.normalize import speaker_znorm
from fed_ser.io import atomic_write_text

def feature_factory(name: str):
    """The extractor factory for ``features.name``."""
    if name == "emobase":
        from fed_ser.features.emobase import emobase_factory

        return emobase_factory
    raise KeyError(f"features.name: unknown feature set {name!r}; available: ['emobase']")


def corpus_root(cfg: DictConfig, corpus: str) -> Path:
    roots = cfg.data.get("roots") or {}
    return Path(roots.get(corpus) or Path(cfg.data.root) / corpus)


def corpus_features(cfg: DictConfig, corpus: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and per-speaker z-normalised features of one corpus (rows that failed dropped)."""
    root = corpus_root(cfg, corpus)
    if cfg.data.synthetic:
        ensure_corpus(root, corpus, scale=float(cfg.data.scale), seed=int(cfg.data.seed))
    manifest, issues = load_corpus(corpus, root)
    problems = [(i.path, i.reason) for i in issues]
    X, ok, failures = extract_features(manifest.path.tolist(), feature_factory(cfg.features.name), cfg.data.cache,
                                       workers=int(cfg.data.workers) or None, desc=f"{cfg.features.name}:{corpus}")
    problems += [(f.path, f.reason) for f in failures]
    if problems:
        print(f"[fed-ser] {corpus}: {len(problems)} entries skipped:", file=sys.stderr)
        for path, reason in problems[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
    manifest = manifest[ok].reset_index(drop=True)
    if manifest.empty:
        raise RuntimeError(f"{corpus}: no usable utterances under {root}")
    manifest.attrs["problems"] = problems
    return manifest, speaker_znorm(X[ok], manifest.speaker.to_numpy())


def prepare(cfg: DictConfig, corpora: list[str], fold: int, train_share: float = 1.0, tag: str = "") -> Path:
    """Build (or reuse) the prepared ``.npz`` for ``corpora`` and ``fold``; return its path."""
    shards = {c: int(cfg.shards.get(c, 1)) for c in corpora}
    key = json.dumps(dict(corpora=sorted(corpora), fold=fold, share=train_share, shards=shards,
                          features=cfg.features.name, scale=float(cfg.data.scale), data_seed=int(cfg.data.seed),
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
