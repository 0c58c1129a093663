"""Real speech end to end (the EmoDB copy beside the project): from audio to report with honest
figures, FedAvg's attacks (round-matched, inversion of multi-step updates) inside the experiment, a new
attack through the registry, no attack reading what the server never received, and a corpus of uneven
speakers (2 to 80 utterances, genders unbalanced) that runs instead of crashing."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from attacks.inference import registry
from attacks.inference.base import AttackerData, ServerView
from attacks.inference.evaluate import Scores
from attacks.inference.round_matched import RoundMatched
from fed_ser.data.federated import FederatedData

ROOT = Path(__file__).resolve().parent.parent
EMODB = Path(os.environ.get("FED_SER_EMODB", ROOT.parent / "shared" / "data" / "emodb"))
pytestmark = pytest.mark.skipif(not (EMODB / "03a01Fa.wav").exists(), reason=f"no EmoDB copy at {EMODB} (set FED_SER_EMODB)")

CELL = ["private=emodb", "shadow.mode=speakers", "private_engine=vectorised", "fl.rounds=12", "fl.fraction=0.25",
        "attack.max_epochs=1", "attack.trials=4"]


class UpdateNorm:
    """A test attack added through the registry: the first layer's update norm, standardised on the
    shadow updates, women above the shadow women's and men's midpoint."""

    name: ClassVar[str] = "update-norm"
    fit_reads_view: ClassVar[bool] = False
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {"update-norm": "first-layer update norm (a test attack)"}

    @classmethod
    def from_settings(cls, attack) -> UpdateNorm:
        return cls()

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        return attacker.store is not None and bool(view.updates)

    @staticmethod
    def _norms(store, updates) -> np.ndarray:
        return np.array([np.linalg.norm(store.attack_input(u, ["dense1.weight"])["dense1.weight"]) for u in updates])

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        norms, labels = self._norms(attacker.store, attacker.updates), attacker.update_labels
        women, men = norms[labels == 1].mean(), norms[labels == 0].mean()
        self.mid, self.sign = (women + men) / 2, np.sign(women - men) or 1.0

    def score(self, view: ServerView) -> dict[str, Scores]:
        z = self.sign * (self._norms(view.store, view.updates) - self.mid) / (abs(self.mid) + 1e-12)
        return {"update-norm": Scores(1 / (1 + np.exp(-10 * z)), view.clients)}

    def describe(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def cell(tmp_path_factory, feature_cache):
    from fed_ser.experiments.attack import main

    tmp = tmp_path_factory.mktemp("emodb-cell")
    args = [f"data.roots.emodb={EMODB}", *CELL, "folds=[0,1,2,3,4]", f"out_dir={tmp / 'cell'}",
            f"data.prepared_dir={tmp / 'prepared'}", f"data.cache={feature_cache}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.ATTACKS, "update-norm", UpdateNorm.from_settings)
        main(args)
    return tmp / "cell", args


def test_emodb_end_to_end_from_audio_to_report(cell):
    """Every attack figure carries a speaker-level interval, the speakers, the balanced accuracy, the
    majority baseline and its control's p-value; the inversion recovers the batches of real speech."""
    out, _ = cell
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert res["schema"] == 2 and res["private_corpus"] == "emodb" and (out / "roc.png").stat().st_size > 0
    inversion = [f["inversion"] for f in res["folds"]]
    assert sum(i["recovered_exactly"] for i in inversion) >= 0.95 * sum(i["utterances_in_batches"] for i in inversion)
    fs = res["attacks"]["feature-space"]
    # 5 folds x 4 private speakers x 4 shards: a speaker attacked in several folds is one cluster
    assert fs["speakers"] <= 10 < fs["clients"] == sum(f["attacks"]["feature-space"]["clients"] for f in res["folds"])
    assert fs["speakers"] < sum(f["attacks"]["feature-space"]["speakers"] for f in res["folds"])
    for name, m in res["attacks"].items():
        assert m["asr_ci"][0] <= m["asr"] <= m["asr_ci"][1] and 0 < m["majority"] < 1, name
        assert "control" in m and 0 < m["p_value"] <= 1 and m["permutations"] >= 1, name
    assert not fs["control"]["above_chance"]
    assert "balanced [95% CI]" in report and "majority" in report and "p (relabellings)" in report
    assert res["ser"]["uar_ci"][0] <= res["ser"]["uar_pooled"] <= res["ser"]["uar_ci"][1] and res["ser"]["test_speakers"] == 10
    assert "Synthetic corpora" not in report  # real speech: no synthetic caveat
    study = res["threshold_study"]["rows"]
    assert [r["mix"] for r in study][:1] == ["1 : 1"] and any(r["own"]["asr_only"] for r in study)


@pytest.fixture(scope="module")
def fedavg_cell(tmp_path_factory, feature_cache):
    """One FedAvg fold with the paper's local settings (Adam, lr 5e-4, one local epoch)."""
    from fed_ser.experiments.attack import main

    tmp = tmp_path_factory.mktemp("emodb-fedavg")
    args = [f"data.roots.emodb={EMODB}", *CELL, "fl=fedavg", "attack.cnn_control_permutations=0", "attack.round_matched.per_update=8", "folds=[0]",
            f"out_dir={tmp / 'cell'}", f"data.prepared_dir={tmp / 'prepared'}", f"data.cache={feature_cache}"]
    main(args)
    return tmp / "cell", args


def test_fedavg_updates_are_attacked_by_round_matching_and_inversion(fedavg_cell):
    """``fl=fedavg`` runs the round-matched attack and the feature-space attack on what the FedAvg inversion
    recovered, each with its control, and the report says how much was recovered."""
    out, _ = fedavg_cell
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert res["algorithm"] == "fedavg"
    for name in ("round-matched", "feature-space"):
        m = res["attacks"][name]
        assert m["clients"] >= 4 and m["permutations"] >= 1 and m["balanced_ci"][0] <= m["balanced"] <= m["balanced_ci"][1], name
    inversion = res["folds"][0]["inversion"]
    # one Adam step a client (~7 rows < B=20): the magnitudes are read, most utterances within 10% of a true one
    assert not inversion["sign_patterns_only"]
    assert inversion["recovered_within_10pct"] >= 0.3 * inversion["utterances_in_batches"]
    assert "round-matched shadow updates (FedAvg)" in report and "## What the inversion recovered" in report
    assert res["folds"][0]["attack_fits"]["round-matched"]["chosen"]["transform"] in ("raw", "sign", "adam")


def test_a_new_attack_through_the_registry_appears_in_the_report(cell):
    out, _ = cell
    report = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "first-layer update norm (a test attack)" in report
    assert "update-norm" in res["attacks"] and res["attacks"]["update-norm"]["permutations"] >= 1


@pytest.mark.parametrize("which,expected", [("cell", {"cnn", "profile", "feature-space"}),
                                            ("fedavg_cell", {"cnn", "profile", "feature-space", "round-matched"})])
def test_no_attack_reads_what_the_server_never_received(which, expected, request, tmp_path):
    """The private clients' genders, speakers and features (none of it travels in a message) permuted or
    replaced: every attack's scores stay bit-identical (FedSGD and FedAvg)."""
    from fed_ser.experiments.attack import attack_fold, train_federations
    from fed_ser.experiments.config import load_config
    from fed_ser.experiments.evaluation import AttackStage

    out, args = request.getfixturevalue(which)
    cfg = load_config([*args, "attack.with_control=false"], "experiment")
    tm, priv_fl, shadow_fl = train_federations(cfg, 0, out)  # the cell's recorded runs, reused
    data = FederatedData.load(tm.private_data)
    rng = np.random.default_rng(7)
    own = data.client >= 0
    X = data.X.copy()
    X[own] = rng.normal(size=(int(own.sum()), X.shape[1])).astype(np.float32)
    names = np.unique(data.client_speaker)
    other = dict(zip(names.tolist(), rng.permutation(names).tolist()))  # speakers renamed among themselves
    rename = np.vectorize(lambda s: other.get(s, other.get(s.split("/")[-1], s)))
    fake = dataclasses.replace(data, X=X, client_gender=np.where(data.client_gender == "F", "M", "F"),
                               client_speaker=rename(data.client_speaker),
                               speaker=None if data.speaker is None else rename(data.speaker))
    fake.save(tmp_path / "private-permuted.npz")
    runs = []
    for t in (tm, dataclasses.replace(tm, private_data=tmp_path / "private-permuted.npz")):
        RoundMatched._simulated = {}  # no simulation or summary carried over from another run: each run does all its work
        runs.append(attack_fold(cfg, 0, t, priv_fl, shadow_fl, AttackStage(cfg)))
    assert set(runs[0].scores) == set(runs[1].scores) and expected <= set(runs[0].scores)
    for name in runs[0].scores:
        assert np.array_equal(runs[0].scores[name].p, runs[1].scores[name].p), name
    # while the evaluation, which reads the truth, does change
    assert runs[0].evaluations["feature-space"].female != runs[1].evaluations["feature-space"].female


def _uneven_manifest(folder: Path) -> Path:
    """A manifest shaped like in-the-wild speech: EmoDB's files regrouped into 29 speakers of 2 to 77
    utterances each, 25 men and 4 women, some speakers with an emotion missing."""
    rows = []
    for wav in sorted(EMODB.glob("*.wav")):
        code = wav.stem[5]
        emotion = {"N": "neutral", "F": "happy", "T": "sad", "W": "angry"}.get(code)
        if emotion:
            rows.append({"path": str(wav), "real": wav.stem[:2], "emotion": emotion})
    df = pd.DataFrame(rows)
    genders = {"03": "M", "08": "F", "09": "F", "10": "M", "11": "M", "12": "M", "13": "F", "14": "F", "15": "M", "16": "F"}
    out, n = [], 0
    for real, part in df.groupby("real"):
        # women: one big speaker (or two); men: cut into many small ones, a few of 2-4 utterances
        sizes = [len(part)] if genders[real] == "F" else [2, 3, 4, 6, 9]
        start = 0
        for k, size in enumerate(sizes):
            chunk = part.iloc[start:start + size] if k < len(sizes) - 1 else part.iloc[start:]
            start += size
            if chunk.empty:
                continue
            if k == 1:
                chunk = chunk[chunk.emotion != "sad"]  # a speaker missing an emotion
            name = "13+14" if real in ("13", "14") else f"{real}-{k}"  # two women's files as one speaker of 77
            out += [{"path": r.path, "speaker": name, "gender": genders[real], "emotion": r.emotion}
                    for r in chunk.itertuples()]
            n += 1
    path = folder / "manifest.csv"
    pd.DataFrame(out).to_csv(path, index=False)
    return path


def test_a_corpus_of_uneven_speakers_runs_end_to_end(tmp_path, feature_cache, capsys):
    """Speakers too small for a training and a validation row are named and dropped before any
    federation starts, never reaching Flower as empty clients; the run finishes with its report."""
    from fed_ser.experiments.attack import main

    manifest = _uneven_manifest(tmp_path)
    df = pd.read_csv(manifest)
    counts = df.groupby("speaker").size()
    genders = df.groupby("speaker").gender.first().value_counts()
    assert counts.min() == 2 and counts.max() >= 70 and genders["M"] >= 5 * genders["F"]
    out = tmp_path / "cell"
    main([f"data.roots.manifest={manifest}", "data.manifest.allow_outside=true", "private=manifest", "shadow.mode=speakers",
          "private_engine=vectorised",
          "fl.rounds=5", "attack.max_epochs=1", "attack.control_permutations=2", "attack.trials=2", "folds=[0]",
          f"out_dir={out}", f"data.prepared_dir={tmp_path / 'prepared'}", f"data.cache={feature_cache}"])
    err = capsys.readouterr().err
    dropped = [s for s, n in counts.items() if n < 3]
    assert dropped and all(f"speaker {s}: speaker dropped: {counts[s]} utterance" in err for s in dropped)
    failures = pd.concat([pd.read_csv(p) for p in (tmp_path / "prepared").glob("*.failures.csv")])
    assert {f"manifest/{s}" for s in dropped} <= set(failures.path)
    res = json.loads((out / "results.json").read_text())
    assert res["attacks"]["feature-space"]["clients"] >= 2 and (out / "report.md").exists()
    for path in (tmp_path / "prepared").glob("*.npz"):  # no client reaches the federation with an empty split
        data = FederatedData.load(path)
        for c in range(data.num_clients):
            data.client_rows(c, 0), data.client_rows(c, 1)


def test_the_calibrated_voice_is_measured_on_the_attackers_speakers_only(cell):
    """data.voice=emodb with private EmoDB: each fold's voice comes from the speakers the attacker holds in
    that fold, never from a speaker whose clients are then attacked or held out for testing."""
    from fed_ser.experiments.config import load_config
    from fed_ser.experiments.prepare import calibration_speakers, resolve_voice

    _, args = cell
    cfg = load_config([*args, "shadow.mode=synthetic", "data.voice=emodb", "data.gender_style=1.0", "data.scale=0.02"], "experiment")
    specs = set()
    for fold in range(5):
        held, said = calibration_speakers(cfg, fold)
        private = FederatedData.load(_private_prepared(cfg, fold))
        test = {s.split("/")[-1] for s in private.test_speakers()}
        assert held and not held & set(private.client_speaker.tolist()) and not held & test, fold
        assert "attacker's emodb speakers of fold" in said
        specs.add(resolve_voice(cfg, fold))
    assert len(specs) > 1 and all(s.startswith("f0:") for s in specs)


def _private_prepared(cfg, fold: int) -> Path:
    from fed_ser.experiments.prepare import corpus_source, prepare

    return prepare(cfg, [corpus_source(cfg, "emodb")], fold, speaker_role="private", tag="emodb-private")
