"""The Hydra configuration: ``conf/`` composed with a user's overrides, and errors as one line.

Every console script goes through :func:`load_config` (Hydra's compose API: ``@hydra.main`` cannot
wrap Flower's app entry points) and :func:`console` (a configuration or input error is one line on
stderr naming the key or file, exit code 2, no traceback). ``--cfg job`` among a script's arguments
prints the composed config instead of running (``--resolve`` too: with its interpolations resolved),
as Hydra's own ``--cfg job`` does.

Every group of ``conf/`` extends a structured schema, ``<group>/schema``, registered here: for the
run-config groups (``fl``, ``model``, ``recorder``, ``dp``, ``flower_dp``, ``adv``) one built from
:class:`~fed_ser.run.settings.RunSettings` (its fields' keys, types and defaults); for ``attack``,
``shadow``, ``data`` and ``features`` their declarations themselves
(:mod:`fed_ser.experiments.settings`, :mod:`attacks.inference.settings`). So a group option's yaml
says only what makes it that option (``fl/fedavg.yaml``: FedAvg's learning rate and optimiser),
every default lives in a dataclass, Hydra rejects an override of the wrong type or an unknown key,
naming it, and :func:`load_config` checks the values of every declared group before returning.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import MISSING, fields, make_dataclass
from dataclasses import field as dc_field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from fed_ser.data.corpora import CorpusError
from fed_ser.data.partition import PartitionError
from fed_ser.experiments.settings import SCHEMAS, check_groups
from fed_ser.run.settings import ConfigError, RunSettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _source(corpus: str, *, _root_: DictConfig) -> str:
    """``${source:<corpus>}`` in ``conf/``: ``real`` if ``data.roots.<corpus>`` is set, else ``synthetic``."""
    return "real" if (_root_.data.get("roots") or {}).get(corpus) else "synthetic"


if not OmegaConf.has_resolver("source"):
    OmegaConf.register_new_resolver("source", _source)


def _voice_dir(voice: str) -> str:
    """``${voice_dir:<voice>}`` in ``data.root``: nothing for the designed voice (its folders keep
    their names), ``-voice_<name>`` for another, so corpora of two voices never share a folder."""
    return "" if voice == "designed" else f"-voice_{voice}"


if not OmegaConf.has_resolver("voice_dir"):
    OmegaConf.register_new_resolver("voice_dir", _voice_dir)

#: The ``conf/`` groups whose keys are run settings; ``recorder.dir`` is chosen by the entry point, not by the user.
RUN_CONFIG_GROUPS = ("fl", "model", "recorder", "dp", "flower_dp", "adv")
_NOT_IN_SCHEMA = {"recorder.dir"}
_HYDRA_ONLY = {"recorder": [("enabled", bool, True)]}  # Hydra knobs of these groups that are no run setting
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def group_schema(group: str) -> type:
    """The structured config of ``conf/<group>/``: one field per run setting keyed ``<group>.<name>``."""
    spec = []
    for f in fields(RunSettings):
        prefix, _, name = f.metadata["key"].partition(".")
        if prefix == group and name and f.metadata["key"] not in _NOT_IN_SCHEMA:
            assert f.default is not MISSING, f.name
            spec.append((name, _TYPES[str(f.type)], dc_field(default=f.default)))
    spec += [(n, t, dc_field(default=d)) for n, t, d in _HYDRA_ONLY.get(group, [])]
    return make_dataclass(f"{group.title().replace('_', '')}Schema", spec, frozen=False)


for _group in RUN_CONFIG_GROUPS:
    ConfigStore.instance().store(group=_group, name="schema", node=group_schema(_group))
for _group, _schemas in SCHEMAS.items():  # attack, shadow, data, features: their declarations are their schemas
    for _name, _schema in _schemas.items():
        ConfigStore.instance().store(group=_group, name=_name, node=_schema)


def _inspection(overrides: list[str]) -> tuple[list[str], bool | None]:
    """``overrides`` without Hydra's inspection flags, and whether they asked to print the config
    (``--cfg job``, ``--cfg=job``, ``-c job``; ``all`` prints the same here: no ``hydra`` node is composed),
    resolved (``--resolve``) or not; None: run."""
    rest, show, resolve, i = [], False, False, 0
    while i < len(overrides):
        o = overrides[i]
        if o in ("--cfg", "-c") and i + 1 < len(overrides) and overrides[i + 1] in ("job", "all"):
            show, i = True, i + 2
            continue
        if o in ("--cfg=job", "--cfg=all"):
            show = True
        elif o == "--resolve":
            resolve = True
        else:
            rest.append(o)
        i += 1
    return rest, (resolve if show else None)


def load_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, and check every declared group's values.

    A wrong override or value raises :class:`ConfigError` with one line naming the key and what it could be.
    With ``--cfg job`` among the overrides it prints the composed config (``--resolve``: resolved) and
    exits (code 0) instead of returning.
    """
    overrides, show = _inspection(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as exc:  # a group option that does not exist (dataset=timit)
        group = next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].lstrip("+~") and
                      f"'{o.split('=', 1)[0].lstrip('+~')}/" in str(exc)), None)
        options = [o for o in re.findall(r"^\t(\S+)$", str(exc), re.M) if not o.endswith("schema")]
        what = f"{group}: no such option" if group else str(exc).splitlines()[0]
        raise ConfigError(f"{what} (available: {', '.join(options)})" if options else what) from None
    except HydraException as exc:
        cause = str(exc.__cause__ or "").splitlines()
        m = re.search(r"Error merging override ([^=\s]+)=", str(exc))
        if m is not None and cause:  # the key exists; the schema's type does not take the value
            raise ConfigError(f"{m.group(1)}: {cause[0]}") from None
        m = re.search(r"Could not override '([^']+)'", str(exc))
        if m is None:
            raise ConfigError(" ".join(str(exc).split("\n")[:2])) from None
        key = m.group(1)
        if cause and not re.search(r"not in (struct|'\w+')", cause[0]):  # the key exists; the value does not fit it
            raise ConfigError(f"{key}: {cause[0]}") from None
        parent, _, _leaf = key.rpartition(".")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose(config_name=config_name)
        node = OmegaConf.select(base, parent) if parent else base
        known = sorted(f"{parent + '.' if parent else ''}{k}" for k in node) if isinstance(node, DictConfig) else []
        raise ConfigError(f"{key}: no such setting" + (f" (known: {', '.join(known)})" if known else "")) from None
    if show is not None:
        print(OmegaConf.to_yaml(cfg, resolve=show), end="", flush=True)
        raise SystemExit(0)
    check_fold(cfg)
    check_groups(cfg)
    return cfg


def check_fold(cfg: DictConfig) -> None:
    """``fold`` (where the config has one) is an integer in ``0..n_folds-1``: one line naming both, not a traceback."""
    if "fold" not in cfg or "n_folds" not in cfg:
        return
    fold, n = cfg.fold, cfg.n_folds
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"n_folds: must be an integer >= 2, got {n!r}")
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < n:
        raise ConfigError(f"fold: must be an integer in 0..{n - 1} (n_folds={n}), got {fold!r}")


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
