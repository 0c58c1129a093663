"""The Hydra configuration: ``conf/`` composed with a user's overrides, and errors as one line.

Every console script goes through :func:`load_config` (Hydra's compose API: ``@hydra.main`` cannot
wrap Flower's app entry points) and :func:`console` (a configuration or input error is one line on
stderr naming the key or file, exit code 2, no traceback).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from fed_ser.core.settings import ConfigError
from fed_ser.data.corpora import CorpusError
from fed_ser.data.partition import PartitionError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _source(corpus: str, *, _root_: DictConfig) -> str:
    """``${source:<corpus>}`` in ``conf/``: ``real`` if ``data.roots.<corpus>`` is set, else ``synthetic``."""
    return "real" if (_root_.data.get("roots") or {}).get(corpus) else "synthetic"


if not OmegaConf.has_resolver("source"):
    OmegaConf.register_new_resolver("source", _source)


def load_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides.

    A wrong override raises :class:`ConfigError` with one line naming the key and what it could be.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as exc:  # a group option that does not exist (dataset=timit)
        group = next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].lstrip("+~") and
                      f"'{o.split('=', 1)[0].lstrip('+~')}/" in str(exc)), None)
        options = re.findall(r"^\t(\S+)$", str(exc), re.M)
        what = f"{group}: no such option" if group else str(exc).splitlines()[0]
        raise ConfigError(f"{what} (available: {', '.join(options)})" if options else what) from None
    except HydraException as exc:
        m = re.search(r"Could not override '([^']+)'", str(exc))
        if m is None:
            raise ConfigError(" ".join(str(exc).split("\n")[:2])) from None
        key = m.group(1)
        cause = str(exc.__cause__ or "").splitlines()
        if cause and "not in struct" not in cause[0]:  # the key exists; the value does not fit it
            raise ConfigError(f"{key}: {cause[0]}") from None
        parent, _, _leaf = key.rpartition(".")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose(config_name=config_name)
        node = OmegaConf.select(base, parent) if parent else base
        known = sorted(f"{parent + '.' if parent else ''}{k}" for k in node) if isinstance(node, DictConfig) else []
        raise ConfigError(f"{key}: no such setting" + (f" (known: {', '.join(known)})" if known else "")) from None


def console(main):
    """Console-script wrapper: a configuration or input error is one line on stderr (exit 2), no traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, CorpusError, PartitionError) as exc:
            print(f"[fed-ser] error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return run
