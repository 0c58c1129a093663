"""Console scripts whose own modules do not turn a bad setting into one line: the same entry points,
wrapped by :func:`~fed_ser.experiments.config.console` (a wrong setting: one line naming the key, exit 2)."""

from __future__ import annotations

import sys

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
