"""Console scripts whose own modules do not turn a bad setting into one line: the same entry points,
wrapped by :func:`~fed_ser.experiments.config.console` (a wrong setting: one line naming the key, exit 2),
and ``fed-ser-synth`` (the synthetic corpora's CLI: it never writes over a folder that holds anything else)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fed_ser.data.synthetic import CORPORA, PAPER_CORPORA, _stamp, ensure_corpus
from fed_ser.data.voice import DEFAULT_GENDER_STYLE, VOICES
from fed_ser.experiments.config import console, load_config
from fed_ser.run.settings import ConfigError


@console
def extract_main(argv: list[str] | None = None) -> None:
    """``fed-ser-extract`` (:func:`fed_ser.experiments.prepare.extract_main`) with its settings checked first."""
    args = list(sys.argv[1:] if argv is None else argv)
    limit = load_config(args, "extract").limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"limit: must be an integer >= 0 (0: every utterance), got {limit!r}")
    from fed_ser.experiments.prepare import extract_main as extract

    extract(args)


@console
def robust_main(argv: list[str] | None = None) -> None:
    """``fed-ser-robust`` (:func:`fed_ser.experiments.robustness.main`)."""
    from fed_ser.experiments.robustness import main as robust

    robust(list(sys.argv[1:] if argv is None else argv))


def _taken(root: Path, stamp: str) -> bool:
    """Whether ``root`` holds anything but nothing or the very synthetic corpus ``stamp`` names."""
    if not root.exists():
        return False
    mark = root / ".fed_ser_synthetic"
    return not root.is_dir() or (any(root.iterdir()) and not (mark.is_file() and mark.read_text() == stamp))


def synth_main(argv: list[str] | None = None) -> None:
    """CLI: ``fed-ser-synth OUT --corpus crema_d --scale 1.0 --seed 0``: each corpus into ``OUT/<corpus>``, which must
    be empty (or hold that very synthetic corpus, then kept): a corpus is never written over a real one."""
    ap = argparse.ArgumentParser(prog="fed-ser-synth", description="Synthetic speech corpora in the published on-disk layouts.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--corpus", choices=CORPORA + ("paper", "all"), default="paper", help="one corpus, the paper's three (paper), or every layout (all)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gender-style", type=float, default=DEFAULT_GENDER_STYLE, help="strength of the gender-by-emotion expression style (0: none)")
    ap.add_argument("--voice", choices=sorted(VOICES), default="designed", help="voice model: designed (fed-ser's first) or emodb (calibrated against EmoDB)")
    a = ap.parse_args(argv)
    corpora = {"paper": PAPER_CORPORA, "all": CORPORA}.get(a.corpus, (a.corpus,))
    taken = [str(a.out / c) for c in corpora if _taken(a.out / c, _stamp(c, a.scale, a.seed, a.gender_style, a.voice))]
    if taken:
        print(f"[fed-ser] error: OUT: {', '.join(taken)} already hold(s) other files (a real corpus?); fed-ser-synth writes "
              "into empty folders only: choose another OUT", file=sys.stderr, flush=True)
        raise SystemExit(2)
    for corpus in corpora:
        t0 = time.perf_counter()
        root = ensure_corpus(a.out / corpus, corpus, a.scale, a.seed, a.gender_style, a.voice)
        print(f"{corpus}: {sum(1 for _ in root.rglob('*.wav'))} wav files in {time.perf_counter() - t0:.1f} s -> {root}")
