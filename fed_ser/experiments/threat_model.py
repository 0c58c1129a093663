"""The threat model of one fold: the private federation and the attacker's own data (``shadow.mode``).

* ``corpora``: other corpora (the paper's threat model; by default the paper's corpora other than
  the private one, real where ``data.roots`` names them, else their synthetic twins);
* ``speakers``: other speakers of the private corpus, disjoint from every private client (a
  seeded, gender-balanced split of each fold's training speakers, ``shadow.speaker_share``);
* ``synthetic``: the synthetic corpora only, whatever ``data.roots`` says.

The folds are the private corpus's speaker-independent SER splits; the attacker's corpora do not
depend on them. So under ``corpora`` and ``synthetic`` one shadow federation (on the attacker's
corpora's fold 0) serves every fold (``shadow.per_fold=false``, the default);
``shadow.per_fold=true`` trains each fold's own. ``speakers`` always does: its attacker holds a
share of each fold's own training speakers. The recorded runs (:func:`train_recorded`) are kept by
the settings that shape them, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fed_ser.data.synthetic import PAPER_CORPORA
from fed_ser.experiments.cli import run_fl, run_settings, run_vectorized_fl
from fed_ser.experiments.prepare import CALIBRATION_CORPUS, CorpusSource, calibration_speakers, corpus_source, prepare
from fed_ser.experiments.settings import shadow_settings
from fed_ser.recording.checkpoint import fingerprint
from fed_ser.run.settings import ConfigError


@dataclass(frozen=True)
class ThreatModel:
    """The private federation and the attacker's data for one fold (``shadow.mode``)."""

    mode: str
    private: str  # the private corpus as reports name it, e.g. "emodb" or "iemocap (synthetic)"
    shadow: tuple[str, ...]  # the attacker's corpora, likewise
    private_data: Path
    shadow_data: Path
    voice: str = ""  # how the synthetic corpora's voice was calibrated, if it was

    def describe(self) -> str:
        if self.mode == "speakers":
            return f"shadow.mode=speakers: the attacker holds other speakers of {self.private}, disjoint from every private client"
        return (f"shadow.mode={self.mode}: the attacker's shadow federations train on {', '.join(self.shadow)}"
                + (f"; {self.voice}" if self.voice else ""))


def fold_calibrated(cfg: DictConfig) -> bool:
    """Whether the synthetic corpora's voice is calibrated on the private corpus's own speakers (those the
    attacker holds in each fold): then each fold has its own shadow corpora, and its private clients are
    the other speakers (the split of ``shadow.mode=speakers``)."""
    return str(cfg.data.voice) == CALIBRATION_CORPUS and str(cfg.private) == CALIBRATION_CORPUS


def check_threat_model(cfg: DictConfig) -> CorpusSource:
    """Stop on a wrong ``shadow.*`` value (checked by its declaration,
    :class:`~fed_ser.experiments.settings.ShadowSettings`) or private
    root before anything is prepared or written; return where the private corpus comes from."""
    shadow_settings(cfg)
    return corpus_source(cfg, str(cfg.private))


def shadow_fold(cfg: DictConfig, fold: int) -> int:
    """The fold of the attacker's data that private fold ``fold`` is attacked with: the fold itself under
    ``shadow.per_fold=true`` or ``shadow.mode=speakers`` (whose attacker holds that fold's own training
    speakers), else fold 0, so that every fold shares one shadow federation and one attack."""
    return fold if bool(cfg.shadow.per_fold) or str(cfg.shadow.mode) == "speakers" or fold_calibrated(cfg) else 0


def threat_model(cfg: DictConfig, fold: int) -> ThreatModel:
    """Prepare the private and the shadow data sets of ``fold`` under ``shadow.mode``."""
    src = check_threat_model(cfg)
    mode, private, share = str(cfg.shadow.mode), str(cfg.private), float(cfg.shadow.share)
    if mode == "speakers":
        priv = prepare(cfg, [src], fold, speaker_role="private", tag=f"{private}-private")
        shadow = prepare(cfg, [src], fold, train_share=share, speaker_role="attacker", tag=f"{private}-attacker")
        return ThreatModel(mode, src.label, (src.label,), priv, shadow)
    if mode == "corpora":
        names = [str(c) for c in cfg.shadow.corpora] or [c for c in PAPER_CORPORA if c != private]
        if private in names:
            raise ConfigError(f"shadow.corpora: {names} must not contain the private corpus {private!r} "
                              "(shadow.mode=speakers splits one corpus's speakers instead)")
        shadow_src = [corpus_source(cfg, c, fold=fold) for c in names]
    else:  # synthetic: the attacker has only the synthetic corpora (never the private corpus' own data)
        shadow_src = [corpus_source(cfg, c, synthetic=True, fold=fold) for c in PAPER_CORPORA if not (src.synthetic and c == private)]
    calibrated = any(s.synthetic for s in shadow_src) and str(cfg.data.voice) == CALIBRATION_CORPUS
    voice = calibration_speakers(cfg, fold)[1] if calibrated else ""
    if fold_calibrated(cfg) and not src.synthetic:  # the calibration speakers are the attacker's: never attacked
        priv = prepare(cfg, [src], fold, speaker_role="private", tag=f"{private}-private")
    else:
        priv = prepare(cfg, [src], fold)
    shadow = prepare(cfg, shadow_src, shadow_fold(cfg, fold), train_share=share,
                     tag="shadow-" + "+".join(s.corpus + ("-synthetic" if s.synthetic else "") for s in shadow_src))
    return ThreatModel(mode, src.label, tuple(s.label for s in shadow_src), priv, shadow, voice)


def run_key(cfg: DictConfig, prepared: Path, engine: str) -> str:
    """What a recorded FL run is known by: every setting that shapes its updates or its SER numbers.

    The checkpoint's fingerprint (the run settings, the content-keyed data file) plus client
    evaluation and the engine; not the number of rounds (a longer run extends a shorter one, as a
    resume does) nor operational settings (paths, timeouts).
    """
    s = run_settings(cfg, prepared, "")
    key = {"run": json.loads(fingerprint(s)), "eval": [s.eval_every, s.eval_fraction], "engine": engine}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def train_recorded(cfg: DictConfig, prepared: Path, fold_dir: Path, role: str, engine: str = "flower") -> dict:
    """Run, or reuse, the recorded FL run ``role`` (private / shadow) of these settings.

    Each run lives in ``<fold_dir>/<role>-<run key>``: a run of other settings is never reused nor
    written over; the same settings reuse a finished run and resume an unfinished or shorter one.
    """
    if engine not in ("flower", "vectorised"):
        raise ConfigError(f"private_engine / shadow.engine: {engine!r} is not 'flower' or 'vectorised'")
    out = fold_dir / f"{role}-{run_key(cfg, prepared, engine)}"
    done = out / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("final", {}).get("round") == int(cfg.fl.rounds):
            res["dir"] = str(out)
            return res
    if engine == "flower":  # resumes after its last finished round: drops no finished round's records
        return {**run_fl(cfg, prepared, str(out), str(out / "updates")), "dir": str(out)}
    # the in-process engine starts over: the folder is this settings' own (run_key), what it drops is an
    # unfinished or shorter run of the very same settings
    cfg = OmegaConf.merge(cfg, {"recorder": {"overwrite": True}})
    return {**run_vectorized_fl(cfg, prepared, str(out), str(out / "updates")), "dir": str(out)}
