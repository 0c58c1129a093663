"""Where the gender signal is kept or lost before the attacker's classifier: probes on the attacked
clients' own statistics (the report's "Where the signal is").

A linear probe, cross-validated over the attacked clients themselves with each speaker in one fold
only, reads each client's emotion-conditional means: of its true training rows, and of the
utterances the inversion recovered from its updates. Its chance level is the same probe with the
speakers' genders relabelled (never the true labelling or its inverse). These probes use the
truth; they measure the pipeline, they are not an attack.
"""

from __future__ import annotations

import numpy as np

from attacks.inference.feature_space import emotion_means, pooled
from attacks.inference.inversion import Recovered
from attacks.inference.unrolled import SIGN_MAGNITUDE
from fed_ser.core.statistics import speaker_labellings
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.experiments.evaluation import client_speakers


def client_signal(data: FederatedData, updates: list, recovered: list[Recovered], fold: int) -> dict:
    """Per attacked client: the emotion-conditional means of its true training rows, of their signs (all
    that a several-step Adam update keeps of them: :mod:`attacks.inference.unrolled`) and of the
    utterances recovered from all its updates (their union), its label (1 = female) and its
    speaker, for :func:`signal_probes`."""
    by_client: dict[int, list[Recovered]] = {}
    for u, r in zip(updates, recovered):
        by_client.setdefault(u.client, []).append(r)
    true, signs, rec, label, speaker = [], [], [], [], []
    keys = client_speakers(data)
    for c, rs in sorted(by_client.items()):
        X, y = data.client_rows(c, TRAIN)
        Xr, yr = pooled(rs)
        true.append(emotion_means(X, y))
        signs.append(emotion_means(SIGN_MAGNITUDE * np.sign(X), y))
        rec.append(emotion_means(Xr, yr) if len(Xr) else np.zeros_like(true[-1]))
        label.append(int(data.client_gender[c] == "F"))
        speaker.append(keys[c])
    return {"true": np.array(true), "true_signs": np.array(signs), "recovered": np.array(rec), "label": np.array(label),
            "speaker": np.array(speaker), "fold": np.full(len(label), fold)}


def signal_probes(signals: list[dict], seed: int = 0, relabellings: int = 5) -> dict:
    """Balanced accuracy of the probe on the clients' true statistics, on their signs, on what the inversion recovered,
    and (chance) on the true statistics under up to ``relabellings`` relabellings of the speakers."""
    from fed_ser.experiments.calibration import probe

    S = {k: np.concatenate([s[k] for s in signals]) for k in signals[0]}
    speakers = np.unique(S["speaker"])
    own = {str(sp): bool(S["label"][S["speaker"] == sp][0]) for sp in speakers}
    chance = [probe(S["true"], np.array([int(lab[str(sp)]) for sp in S["speaker"]]), S["speaker"])
              for lab in speaker_labellings(own, relabellings, seed)]
    chance = [c for c in chance if np.isfinite(c)]
    return {"probe_true": probe(S["true"], S["label"], S["speaker"]),
            "probe_true_signs": probe(S["true_signs"], S["label"], S["speaker"]) if "true_signs" in S else None,
            "probe_recovered": probe(S["recovered"], S["label"], S["speaker"]),
            "probe_true_shuffled": float(np.mean(chance)) if chance else float("nan"),
            "probe_true_shuffled_runs": len(chance),
            "clients": int(len(S["label"])), "speakers": int(len(speakers))}
