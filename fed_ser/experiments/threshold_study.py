"""The adaptive threshold on populations of other gender mixes.

The feature-space attack's adaptive variant puts its threshold between the two clusters of the
attacked clients' scores (:meth:`attacks.inference.feature_space.FeatureSpaceAttack.adapted`). That
assumes both genders are among the attacked clients, in not too unequal numbers. This study draws
attacked populations from a cell's clients at set mixes (1:1, 1:3, 1:9 and one gender only, either
way round), sets the threshold on each drawn population's own scores, fold by fold (each fold's
attack has its own classifier, and the headline's adaptive variant adapts within its fold: one
threshold over several folds' scores would mix their scales), and reports the balanced
accuracy at that threshold beside the one at the attacker's own threshold (its headline figure),
so a reader sees where the adaptive threshold fails.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit

from attacks.inference.evaluate import Scores, client_success
from attacks.inference.feature_space import two_means_threshold
from fed_ser.core.statistics import balanced_accuracy

MIXES = ((1, 1), (1, 3), (3, 1), (1, 9), (9, 1), (1, 0), (0, 1))  # women : men


def _draw(women: np.ndarray, men: np.ndarray, mix: tuple[int, int], rng: np.random.Generator) -> np.ndarray | None:
    """A population of the given mix, as large as the clients allow (None if they cannot make it)."""
    fw, fm = mix
    if fw and fm:
        unit = min(len(women) // fw, len(men) // fm)
        if unit < 1:
            return None
        return np.concatenate([rng.choice(women, fw * unit, replace=False), rng.choice(men, fm * unit, replace=False)])
    pool = women if fw else men
    return rng.choice(pool, len(pool), replace=False) if len(pool) else None


def _spread(values: list[float], one_gender: bool) -> dict:
    return {"mean": float(np.mean(values)), "low": float(np.quantile(values, 0.025)),
            "high": float(np.quantile(values, 0.975)), "asr_only": one_gender}


def threshold_study(scores: list[Scores], female: list[dict[int, int]], keys: list[int], trials: int = 10,
                    draws: int = 50, seed: int = 0) -> dict:
    """Per mix: balanced accuracy (or, with one gender, the ASR) at the attacker's own threshold and at the
    adaptive one, mean and 2.5-97.5% over ``draws`` drawn populations.

    ``scores[f]`` are fold ``f``'s feature-space scores (own threshold) per update, ``female[f]`` its
    truth by client key, ``keys[f]`` its key offset.
    """
    p = np.concatenate([s.p for s in scores])
    clients = np.concatenate([s.clients + k for s, k in zip(scores, keys)])
    fold_of = np.concatenate([np.full(len(s.p), f) for f, s in enumerate(scores)])
    truth = {c: v for f in female for c, v in f.items()}
    z = logit(np.clip(p, 1e-12, 1 - 1e-12))
    women = np.array(sorted(c for c in set(clients.tolist()) if truth[c]))
    men = np.array(sorted(c for c in set(clients.tolist()) if not truth[c]))
    rng = np.random.default_rng([seed, 61])
    rows, size = [], 0
    for mix in MIXES:
        own, adaptive = [], []
        for _ in range(draws):
            pop = _draw(women, men, mix, rng)
            if pop is None:
                break
            size = len(pop)
            sel = np.isin(clients, pop)
            labels = np.array([truth[c] for c in clients[sel]])
            zs, folds, moved = z[sel], fold_of[sel], np.empty(int(sel.sum()))
            for f in np.unique(folds):
                here = folds == f
                moved[here] = zs[here] - two_means_threshold(zs[here])
            for out, q in ((own, p[sel]), (adaptive, expit(moved))):
                success = client_success(lambda idx, q=q: float(q[idx].mean()), clients[sel], labels, trials, 1, seed)
                cs = sorted(success)
                values = np.array([success[c] for c in cs])
                fem = np.array([truth[c] for c in cs])
                out.append(balanced_accuracy(values, fem) if fem.any() and not fem.all() else float(values.mean()))
        if own:
            one = not (mix[0] and mix[1])
            rows.append({"mix": f"{mix[0]} : {mix[1]}", "clients": size, "own": _spread(own, one), "adaptive": _spread(adaptive, one)})
    return {"rows": rows, "draws": draws, "women": len(women), "men": len(men)}
