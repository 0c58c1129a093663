"""Configuration: Flower's run config and Hydra's config name the same knobs; bad values are
rejected with the key in the message."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fed_ser.experiments.cli import load_config, run_settings
from fed_ser.run.settings import ConfigError, RunSettings

ROOT = Path(__file__).resolve().parent.parent


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_pyproject_run_config_is_what_the_apps_read():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fed_ser.flower.server_app:app", "clientapp": "fed_ser.flower.client_app:app"}
    s = RunSettings.from_run_config({**_flatten(app["config"]), "data.prepared": "x.npz"})
    assert s.algorithm == "fedsgd" and s.batch_size == 20 and s.lr == 0.1
    # `flwr run --run-config k=v` only accepts keys declared there: every setting must be
    assert set(_flatten(app["config"])) == set(RunSettings._KEYS.values())


def test_every_default_is_the_same_whichever_entry_point_runs():
    """fed-ser-train (Hydra), flwr run (pyproject's run config) and the in-process engines (RunSettings)
    must start from the same values; only paths differ by entry point."""
    app = _flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    hydra = run_settings(load_config([]), Path("x.npz"), "out", "out/updates").to_run_config()
    dataclass = RunSettings(prepared="x.npz").to_run_config()
    paths = {"data.prepared", "out_dir", "recorder.dir"}
    differ = {k: (dataclass[k], app[k], hydra[k]) for k in dataclass
              if k not in paths and len({repr(v) for v in (dataclass[k], app[k], hydra[k])}) > 1}
    assert not differ, f"defaults differ (dataclass, pyproject, hydra): {differ}"
    for group in ("sample", "user", "udp"):  # a DP mode switched on changes no other default
        dp = run_settings(load_config([f"dp={group}", "fl=fedavg" if group != "sample" else "fl=fedsgd"]), Path("x"), "")
        assert (dp.dp_delta, dp.dp_clip, dp.dp_epsilon) == (hydra["dp.delta"], hydra["dp.clip"], hydra["dp.epsilon"])


def test_conf_groups_extend_the_schema_built_from_run_settings_and_repeat_no_default():
    """Every default of a run setting is written once, in RunSettings: a group option's yaml sets only
    what makes it that option, and Hydra checks types and keys against the schema."""
    import yaml

    from fed_ser.experiments.config import RUN_CONFIG_GROUPS

    defaults = RunSettings(prepared="x").to_run_config()
    for group in RUN_CONFIG_GROUPS:
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            doc = yaml.safe_load(path.read_text()) or {}
            assert doc.get("defaults") == ["schema", "_self_"], path
            again = {k: v for k, v in doc.items() if k not in ("defaults", "algorithm", "mode")  # the option's own name may equal the default
                     and defaults.get(f"{group}.{k}", object()) == v}
            assert not again, f"{path.relative_to(ROOT)} repeats the defaults {again}"
            composed = load_config([f"{group}={path.stem}"])
            assert set(composed[group]) >= {k.split(".", 1)[1] for k in defaults if k.startswith(group + ".")} - {"dir"}
    with pytest.raises(ConfigError, match=r"^fl\.rounds: Value 'abc'"):
        load_config(["fl.rounds=abc"])
    with pytest.raises(ConfigError, match=r"^fl\.nope: no such setting \(known: fl\.algorithm"):
        load_config(["fl.nope=1"])


def test_hydra_overrides_reach_the_run_settings():
    cfg = load_config(["fl=fedavg", "fl.rounds=7", "model.dropout=0.4", "fold=2", "recorder.layers=dense1"])
    s = run_settings(cfg, Path("x.npz"), "out")
    assert (s.algorithm, s.rounds, s.dropout, s.lr, s.optimizer) == ("fedavg", 7, 0.4, 0.0005, "adam")
    assert s.layers() == ["dense1"] and cfg.fold == 2
    assert RunSettings.from_run_config(s.to_run_config()) == s


@pytest.mark.parametrize("key,value,match", [
    ("fl.algorithm", "fedprox", "fl.algorithm"),
    ("fl.fraction", 0.0, "fl.fraction"),
    ("model.dropout", 1.2, "model.dropout"),
    ("fl.rounds", "many", "fl.rounds"),
    ("fl.typo", 1, "unknown run-config keys"),
    ("fl.poll_interval", 0.0, "fl.poll_interval"),
    ("fl.poll_interval", 700.0, "fl.poll_interval"),  # longer than fl.round_timeout
])
def test_bad_values_name_their_key(key, value, match):
    cfg = RunSettings(prepared="x").to_run_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(cfg)


def test_multirun_expands_the_cartesian_product_of_comma_lists():
    from fed_ser.experiments.cli import expand_overrides

    multirun, runs = expand_overrides(["-m", "private=iemocap,crema_d", "fl=fedsgd,fedavg", "folds=[0,1]"])
    assert multirun and len(runs) == 4
    assert ["private=crema_d", "fl=fedavg", "folds=[0,1]"] in runs
    assert expand_overrides(["fl=fedavg,x"]) == (False, [["fl=fedavg,x"]])  # no -m: passed as is


def test_checkpoint_fingerprint_ignores_operational_keys_and_inactive_defences():
    from fed_ser.recording.checkpoint import fingerprint

    base = fingerprint(RunSettings(prepared="a/x.npz"))
    same = RunSettings(prepared="b/x.npz", rounds=7, round_timeout=5.0, poll_interval=1.0,  # folder, rounds, waits, adv off
                       adv_epsilon=0.3)
    assert fingerprint(same) == base
    assert fingerprint(RunSettings(prepared="a/x.npz", adv_mix=0.5)) != base
    assert fingerprint(RunSettings(prepared="a/x.npz", dropout=0.4)) != base


def test_synthetic_gender_style_default_matches_the_generator_and_bad_values_name_the_key(tmp_path):
    from fed_ser.data.voice import DEFAULT_GENDER_STYLE
    from fed_ser.experiments.prepare import corpus_source

    assert load_config([]).data.gender_style == DEFAULT_GENDER_STYLE  # one default, not two
    with pytest.raises(ConfigError, match=r"^data\.gender_style: must be >= 0"):
        corpus_source(load_config([f"data.root={tmp_path}", "data.gender_style=-1"]), "iemocap")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("key", ["workers", "ransac_stall", "ransac_give_up"])
def test_a_bad_inversion_setting_stops_the_experiment_before_its_folder_exists(tmp_path, key):
    from fed_ser.experiments.attack import run_experiment

    with pytest.raises(ConfigError, match=rf"^attack\.feature_space\.{key}: .*>= 0"):
        run_experiment(load_config([f"out_dir={tmp_path / 'cell'}", f"attack.feature_space.{key}=-1"], "experiment"))
    assert not (tmp_path / "cell").exists()


def test_a_non_boolean_shadow_per_fold_stops_the_experiment_before_its_folder_exists(tmp_path):
    from fed_ser.experiments.attack import run_experiment

    with pytest.raises(ConfigError, match=r"^shadow\.per_fold: Value 'sometimes' is not a valid bool"):
        run_experiment(load_config([f"out_dir={tmp_path / 'cell'}", "shadow.per_fold=sometimes"], "experiment"))
    assert not (tmp_path / "cell").exists()


@pytest.mark.parametrize("override,match", [
    ("fl.eval_fraction=7", r"^fl\.eval_fraction: must be in \(0, 1\]"),  # waited for 28 of 4 nodes for ever
    ("fl.eval_fraction=0", r"^fl\.eval_fraction"),
    ("fl.lr=inf", r"^fl\.lr: must be a finite number > 0, got inf"),  # trained 200 rounds to chance
    ("fl.lr=nan", r"^fl\.lr: must be a finite number"),
    ("fl.lr=0", r"^fl\.lr"),
    ("recorder.layers=nosuch", r"^recorder\.layers: \['nosuch'\] not among the model's layers \['dense1', 'dense2', 'out'\]"),
    ("recorder.layers='dense1,dense3'", r"^recorder\.layers: \['dense3'\]"),
    ("fl.min_available=-3", r"^fl\.min_available: must be >= 0"),
])
def test_settings_that_hang_or_train_nonsense_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        run_settings(load_config([override]), Path("x.npz"), "out")


def test_the_recordable_layers_are_the_models_linear_layers():
    import torch

    from fed_ser.core.model import build_model
    from fed_ser.run.settings import LAYERS

    model = build_model(10, 0.2, 0)
    linear = tuple(n for n, m in model.named_children() if isinstance(m, torch.nn.Linear))
    assert linear == LAYERS
    assert run_settings(load_config(["recorder.layers='dense1,out'"]), Path("x.npz"), "out").layers() == ["dense1", "out"]


def _script(name: str):
    """The function pyproject.toml installs as console script ``name``."""
    import importlib

    ref = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("script,argv,key", [
    ("fed-ser-deploy", ["deploy.nodes=0"], "deploy.nodes: must be an integer >= 1, got 0"),
    ("fed-ser-deploy", ["fl.rounds=x"], "fl.rounds: Value 'x'"),
    ("fed-ser-deploy", ["deploy.isolation=vpn"], "deploy.isolation: 'vpn' is not one of ('netns', 'none')"),
    ("fed-ser-train", ["fold=9"], "fold: must be an integer in 0..4 (n_folds=5), got 9"),
    ("fed-ser-train", ["fold=-1"], "fold: must be an integer in 0..4"),
    ("fed-ser-train", ["fl.min_available=-3"], "fl.min_available: must be >= 0"),
    ("fed-ser-train", ["fl.eval_fraction=7"], "fl.eval_fraction: must be in (0, 1]"),
    ("fed-ser-extract", ["limit=-1"], "limit: must be an integer >= 0"),
    ("fed-ser-extract", ["features=nosuch"], "features: no such option"),
    ("fed-ser-robust", ["fl.lr=x"], "fl.lr: Value 'x'"),
    ("fed-ser-deploy-setup", ["--out", "o", "--work", "w", "--nodes", "0"], "--nodes: must be >= 1, got 0"),
])
def test_console_scripts_turn_a_bad_setting_into_one_line_naming_the_key(script, argv, key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing here is the project's
    with pytest.raises(SystemExit) as stop:
        _script(script)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(f"[fed-ser] error: {key}"), err
    assert not any(tmp_path.iterdir())


def test_fed_ser_train_over_a_checkpoint_of_other_settings_is_one_line(tmp_path, capsys, monkeypatch):
    import fed_ser.experiments.cli as cli
    from fed_ser.recording.checkpoint import save_checkpoint

    out = tmp_path / "run"
    save_checkpoint(out / "checkpoint.npz", 3, RunSettings(prepared="x.npz", dropout=0.4, out_dir=str(out)), {})
    monkeypatch.setattr(cli, "prepare", lambda cfg, corpora, fold: Path("x.npz"))  # the data a run of these settings uses
    with pytest.raises(SystemExit) as stop:
        _script("fed-ser-train")([f"out_dir={out}", "model.dropout=0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("[fed-ser] error: resume: ") and "model.dropout: 0.4 there, 0.2 now" in err[0]


def test_declared_groups_extend_their_declarations_and_repeat_no_default():
    """attack, shadow, data and features: each option's yaml extends its group's declaration (a dataclass,
    also the Hydra schema) and says only what makes it that option; the composed group holds every
    declared key, and nothing the declaration lacks."""
    from dataclasses import fields

    import yaml
    from omegaconf import OmegaConf

    from fed_ser.experiments.settings import SCHEMAS

    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            defaults = OmegaConf.to_container(OmegaConf.structured(schema))
            for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
                doc = yaml.safe_load(path.read_text()) or {}
                if doc.get("defaults") != [name, "_self_"]:
                    continue
                again = {k: v for k, v in doc.items() if k not in ("defaults", "name") and defaults.get(k, object()) == v}
                assert not again, f"{path.relative_to(ROOT)} repeats the defaults {again}"
                composed = load_config([f"{group}={path.stem}"], "experiment")[group]
                assert set(composed) == {f.name for f in fields(schema)}, path
    experiment = load_config([], "experiment")
    assert set(experiment.shadow) == {f.name for f in fields(SCHEMAS["shadow"]["schema"])}
    assert set(experiment.data) == {f.name for f in fields(SCHEMAS["data"]["schema"])}
    for option in ("default", "paper"):  # every option of attack/ goes through the schema
        assert OmegaConf.get_type(load_config([f"attack={option}"], "experiment").attack).__name__ == "AttackSettings"


def test_every_corpus_has_a_declared_root():
    from dataclasses import fields

    from fed_ser.data.corpora import LOADERS
    from fed_ser.experiments.settings import DataRoots

    assert {f.name for f in fields(DataRoots)} == set(LOADERS)


def test_the_cnn_is_built_from_the_attack_settings_not_a_copy():
    """AttackConfig is the CNN's part of the attack group's declaration: every field comes from the
    composed config, the paper's layout under attack=paper, the CPU-sized one by default."""
    from dataclasses import fields

    from attacks.inference.cnn import attack_config
    from attacks.inference.settings import AttackConfig, AttackSettings

    assert issubclass(AttackSettings, AttackConfig)
    for overrides, pools, stride in [([], (1, 4, 4), 4), (["attack=paper"], (2, 4, 8), 1),
                                     (["attack.pools=[4,4,4]", "attack.max_epochs=3"], (4, 4, 4), 4)]:
        attack = load_config(overrides, "experiment").attack
        cnn = attack_config(attack)
        assert type(cnn) is AttackConfig and (cnn.pools, cnn.first_stride) == (pools, stride)
        assert {f.name: getattr(cnn, f.name) for f in fields(AttackConfig)} == {
            f.name: (tuple(attack[f.name]) if isinstance(getattr(cnn, f.name), tuple) else
                     list(attack[f.name]) if isinstance(getattr(cnn, f.name), list) else attack[f.name]) for f in fields(AttackConfig)}
    assert attack_config(load_config(["attack.max_epochs=3"], "experiment").attack).max_epochs == 3
    assert attack_config(load_config(["size=paper"], "experiment").attack).max_epochs == 50  # size=quick's 6 otherwise
    assert attack_config(load_config([], "experiment").attack).max_epochs == 6


@pytest.mark.parametrize("override,match", [
    # Hydra, against the declarations: a wrong type or an unknown key
    ("attack.max_epochs=abc", r"^attack\.max_epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("attack.nope=1", r"^attack\.nope: no such setting \(known: attack\.aggregate_observer"),
    ("attack.feature_space.ransac_draws=many", r"^attack\.feature_space\.ransac_draws: Value 'many'"),
    ("attack.feature_space.nope=1", r"^attack\.feature_space\.nope: no such setting"),
    ("attack.with_control=maybe", r"^attack\.with_control: Value 'maybe' is not a valid bool"),
    ("shadow.share=most", r"^shadow\.share: Value 'most'"),
    ("shadow.nope=1", r"^shadow\.nope: no such setting \(known: shadow\.corpora"),
    ("data.scale=big", r"^data\.scale: Value 'big'"),
    ("data.nope=1", r"^data\.nope: no such setting"),
    ("data.manifest.nope=1", r"^data\.manifest\.nope: no such setting"),
    ("features.nope=1", r"^features\.nope: no such setting"),
    ("features.ckpt=/m.ckpt", r"^features\.ckpt: no such setting"),  # emobase has no checkpoint
    # the declarations' own checks: the right type, a value that makes no sense
    ("attack.precision=float16", r"^attack\.precision: 'float16' is not one of \('auto', 'float32', 'bfloat16'\)$"),
    ("attack.pools=[4,4]", r"^attack\.pools: one pool size >= 1 per convolution of attack\.channels \[16, 32, 64\], got \[4, 4\]$"),
    ("attack.layers=[dense9]", r"^attack\.layers: \['dense9'\] not among the model's layers"),
    ("attack.lr=0", r"^attack\.lr: must be a finite number > 0, got 0\.0$"),
    ("attack.control_permutations=0", r"^attack\.control_permutations: must be >= 1, got 0$"),
    ("attack.cnn_control_permutations=-1", r"^attack\.cnn_control_permutations: must be >= 0"),
    ("attack.pool_rounds=[0]", r"^attack\.pool_rounds: "),
    ("attack.profile.layer=conv", r"^attack\.profile\.layer: 'conv' is not one of the model's layers"),
    ("attack.feature_space.draws_from=guess", r"^attack\.feature_space\.draws_from: 'guess' is not one of"),
    ("attack.feature_space.aggregate_ransac_draws=-5", r"^attack\.feature_space\.aggregate_ransac_draws: must be >= 0 or null"),
    ("shadow.mode=guess", r"^shadow\.mode: 'guess' is not one of \('corpora', 'speakers', 'synthetic'\)$"),
    ("shadow.share=0", r"^shadow\.share: must be in \(0, 1\], got 0\.0$"),
    ("shadow.speaker_share=1", r"^shadow\.speaker_share: must be in \(0, 1\)"),
    ("shadow.engine=ray", r"^shadow\.engine: 'ray' is not one of \('flower', 'vectorised'\)$"),
    ("shadow.corpora=[timit]", r"^shadow\.corpora: \['timit'\] not among the corpora"),
    ("data.scale=0", r"^data\.scale: must be a finite number > 0"),
    ("data.workers=-1", r"^data\.workers: must be >= 0"),
    ("data.voice=robot", r"^data\.voice: voice must be one of"),
    ("data.manifest.emotion_map=[joy]", r"^data\.manifest\.emotion_map: a mapping of manifest labels"),
    ("features.norm=global", r"^features\.norm: 'global' is not one of \('speaker', 'client', 'none'\)$"),
    ("folds=[0,7]", r"^folds: distinct folds in 0\.\.4 \(n_folds=5\), got \[0, 7\]$"),
    ("private=timit", r"^private: 'timit' is not one of the corpora"),
    ("private_engine=ray", r"^private_engine: 'ray' is not one of"),
])
def test_a_wrong_value_in_a_declared_group_is_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config([override], "experiment")
    assert "\n" not in str(err.value)


def test_declared_values_are_read_typed():
    from fed_ser.experiments.settings import attack_settings, data_settings, features_settings, shadow_settings

    cfg = load_config(["features=apc", "features.ckpt=/m/apc.ckpt", "shadow.corpora=[crema_d]", "data.scale=1",
                       "data.manifest.emotion_map={joy: happy, fear: null}", "attack.feature_space.aggregate_ransac_draws=7"],
                      "experiment")
    attack = attack_settings(cfg)
    assert attack.pools == (1, 4, 4) and attack.pool_rounds == [1, 5] and attack.feature_space.aggregate_draws == 7
    assert attack_settings(load_config([], "experiment")).feature_space.aggregate_draws == 20_000  # null: ransac_draws
    assert shadow_settings(cfg).corpora == ["crema_d"] and features_settings(cfg).ckpt == "/m/apc.ckpt"
    data = data_settings(cfg)
    assert data.scale == 1.0 and isinstance(data.scale, float) and data.manifest.emotion_map == {"joy": "happy", "fear": None}
    assert data.root == "data/synthetic/scale1.0-seed0-style2.0"  # interpolations resolved


def test_cfg_job_prints_the_composed_config_and_runs_nothing(capsys, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        _script("fed-ser-experiment")(["--cfg", "job", "size=paper", "private=crema_d"])
    assert stop.value.code == 0 and not any(tmp_path.iterdir())
    out = capsys.readouterr().out
    assert OmegaConf.create(out) == load_config(["size=paper", "private=crema_d"], "experiment")
    assert "  max_epochs: 50\n" in out and "out_dir: runs/experiment/${private}-" in out  # as composed, unresolved
    with pytest.raises(SystemExit):
        _script("fed-ser-train")(["--cfg", "job", "--resolve", "fl=fedavg"])
    resolved = OmegaConf.create(capsys.readouterr().out)
    assert resolved.out_dir == "runs/train/crema_d-emobase-fedavg-fold0" and resolved.fl.lr == 0.0005
