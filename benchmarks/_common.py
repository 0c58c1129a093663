"""Shared set-up for the benchmark scripts: the project's own config and data preparation."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fed_ser.experiments.config import load_config  # noqa: E402
from fed_ser.experiments.prepare import prepare  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, e.g. data.scale=1.0")
    p.add_argument("--json", type=Path, help="also write the measured numbers to this JSON file")
    return p


def prepared(overrides: list[str], corpora: list[str], fold: int = 0, share: float = 1.0, tag: str = ""):
    """(cfg, path) of a prepared federated data set, built with the project's pipeline."""
    cfg = load_config(overrides)
    return cfg, prepare(cfg, corpora, fold, train_share=share, tag=tag)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(title: str, rows: list[tuple[str, str]], out: Path | None, numbers: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if out is not None:
        out.write_text(json.dumps(numbers, indent=2))
