"""Inversion of FedAvg updates: the client's utterances from ``theta(t) - theta_k(t)``.

fed-ser's FedSGD inversion (:mod:`attacks.inference.inversion`, in the line of SPEAR, Dimitrov et al.,
NeurIPS 2024) reads a batch from the exact low-rank structure of one gradient,
``dL/d[W1, b1] = (1/B) sum_i delta_i [x_i; 1]^T``. A FedAvg update is what the client's local optimiser
made of its steps' gradients, and the paper's clients use Adam, whose first step moves each weight by
``lr * g / (|g| + eps)``: ``lr * sign(g)`` to the eye, which destroys that structure. What survives:

1. **Rows one sample alone drives.** A unit active (and kept by dropout) for one sample of the client and
   for no other, in every step, has weight row ``a_j x_i^T`` and bias ``a_j`` whatever the steps did to
   ``a_j`` (SGD: the sum of that sample's errors there): the ratio ``dW1_j / db1_j`` *is* ``x_i``, scale
   included, and under Adam the row's sign pattern is ``sign(x_i)``. With ~7 rows a client on EmoDB a
   sample has several such rows among 256 units (the ReLU and dropout sparsity SPEAR also uses); with
   many rows a client few units are left to one sample, and the inversion finds fewer samples.
2. **Adam's eps leaves the magnitude in the low bits, for one step.** ``1 - |step| / lr = eps / (|g| + eps)``;
   in float32 the returned weight ``theta - step`` keeps it to the rounding of ``theta``, so every entry
   with ``|g|`` below ~1e-3 (EmoDB's model: 55-70% of the first layer's entries) gives ``|g|`` to a few per
   cent, the rest their sign (:func:`gradient_estimate` inverts the optimiser elementwise with that noise
   model; the weight decay term is subtracted, the global model being known). After several Adam steps
   each entry's move is set by how its row's error changed between the steps, not by ``|g|`` alone, and
   only the sign pattern is read (:func:`reads_magnitude`).

:func:`invert_fedavg` groups rows into samples (by ratio where magnitudes are read, by sign pattern
otherwise), takes each sample's per-feature median ratio (or its sign pattern), and its emotion as the
label whose backpropagated error at the round's global model best matches the sample's rows.

The reference method for multi-step updates, **gradient matching through the unrolled local training**
(Dimitrov et al., "Data leakage in federated averaging", TMLR 2022), is :func:`refine`: the client's round
is replayed differentiably from the global model (:class:`attacks.inference.simulate.Unroll`, Adam
included) and the recovered inputs (and the unknown dropout masks, relaxed) are moved so that the
simulated update matches the observed one. From a random start it does not find EmoDB's 988-dimensional
inputs through Adam's sign-like steps; from the rows' estimate it moves them little (docs/fedavg_attack.md).

What it needs, as the server of the paper's threat model knows it: the update, the round's global model,
the client's ``num_examples`` and the local settings. Not the order of the client's rows, nor its dropout masks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components

from attacks.inference.inversion import Recovered
from attacks.inference.simulate import LocalSettings, Unroll, model_at
from fed_ser.core.training import make_optimizer

#: An entry's gradient magnitude counts as read when its relative uncertainty is below this.
RELIABLE = 0.2
#: Two rows are one sample's when their ratios differ by less than this (relative, median over shared entries).
SAME_SAMPLE = 0.05
#: A group is a sample's when the input it gives activates at least this share of its rows at the global model.
ACTIVE_SHARE = 0.9
SIGN_ACTIVE_SHARE = 0.75  # the same with only the sign pattern read (its pre-activations are rough)
#: A sample needs at least this many rows of its own.
MIN_ROWS = 3
#: The protocol z-normalises each speaker's features: an input whose root mean square exceeds this is not one.
MAX_RMS = 4.0


@dataclass
class GradientEstimate:
    """Per layer, the local steps' summed gradient as the update reveals it: ``value`` and its
    one-sigma ``error`` (``inf`` where only the sign is known; ``value`` is then a lower bound)."""

    value: dict[str, np.ndarray]
    error: dict[str, np.ndarray]

    def reliable(self, key: str) -> np.ndarray:
        return self.error[key] < RELIABLE * np.abs(self.value[key])


def gradient_estimate(delta: dict[str, np.ndarray], params: dict[str, np.ndarray], settings: LocalSettings,
                      steps: int) -> GradientEstimate:
    """Invert the client optimiser's elementwise map: from ``delta = theta - theta_k`` (float32 arrays as
    the store holds them) and the global ``params`` to the summed step gradients, for ``steps`` local steps.

    SGD: ``delta / lr`` (exact). Adam: per step ``|g| = eps r / (1 - r)`` with ``r = |delta| / (lr T)``
    (the mean step), its error from the float32 rounding of ``theta`` (``sqrt(T)`` roundings), minus the
    weight decay term; entries with ``r`` at the rounding floor keep their sign and a lower bound.
    Returned per step (Adam) or summed (SGD): the sole-row ratios do not depend on which.
    """
    h = make_optimizer(settings.optimizer, [torch.zeros(1, requires_grad=True)], settings.lr).defaults
    value, error = {}, {}
    for k, D in delta.items():
        D = np.asarray(D, dtype=np.float64)
        th = np.asarray(params[k], dtype=np.float32)
        if settings.optimizer == "sgd":
            value[k] = D / settings.lr
            error[k] = np.spacing(np.abs(th)).astype(np.float64) * np.sqrt(steps) / settings.lr
            continue
        step = settings.lr * steps
        r = np.clip(np.abs(D) / step, 0.0, 1.0 - 1e-12)
        g = np.sign(D) * h["eps"] * r / (1.0 - r)
        sigma_r = np.sqrt(steps) * np.spacing(np.abs(th)).astype(np.float64) / (2.0 * step)
        rel = sigma_r / np.maximum(1.0 - r, 1e-300) / np.maximum(r, 1e-12)
        value[k] = g - h["weight_decay"] * th.astype(np.float64)
        error[k] = np.where(rel < 1.0, rel * np.abs(g), np.inf)
    return GradientEstimate(value, error)


def _sample_from_rows(G: np.ndarray, Gerr: np.ndarray, b: np.ndarray, berr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One sample from its sole rows: per feature, the median ratio ``G_jk / b_j`` over the rows where the entry
    is read. A row whose bias entry is not read (its magnitude saturated) has its ratios scaled onto those of the
    rows whose bias is; where no row's is, the scale is the prior of z-normalised features (median ``|x|`` of a
    standard normal). A feature no row reads gets the rows' majority sign times the largest lower bound."""
    R = G[rows] / b[rows, None]
    ok = Gerr[rows] < RELIABLE * np.abs(G[rows])
    anchored = berr[rows] < RELIABLE * np.abs(b[rows])

    def median(M: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # features no row reads: NaN, filled below
            return np.nanmedian(np.where(mask, M, np.nan), axis=0)

    ref = anchored if anchored.any() else (np.arange(len(rows)) == int(np.argmax(ok.sum(1))))
    x_ref = median(R[ref], ok[ref])
    for j in np.flatnonzero(~ref):  # this row's ratios are x times an unknown factor: fit it on the shared entries
        shared = ok[j] & np.isfinite(x_ref) & (np.abs(x_ref) > 0.1)
        if shared.sum() >= 5:
            R[j] /= np.median(R[j, shared] / x_ref[shared])
        else:
            ok[j] = False
    x = median(R, ok)
    if not anchored.any() and np.isfinite(x).any():
        x = x * (0.6745 / max(float(np.nanmedian(np.abs(x))), 1e-12))
    missing = ~np.isfinite(x)
    if missing.any():
        sign = np.sign(np.sign(R).sum(0) + 1e-9)
        bound = np.nanmax(np.where(np.isfinite(R), np.abs(R), np.nan), axis=0) if np.isfinite(R).any() else np.ones(R.shape[1])
        x = np.where(missing, sign * np.nan_to_num(bound, nan=SIGN_MAGNITUDE), x)
    return x


def _ratio_groups(G: np.ndarray, Gerr: np.ndarray, b: np.ndarray, berr: np.ndarray) -> list[np.ndarray]:
    """Rows whose weight/bias ratios agree on the entries read in both (each group: one sample's sole
    rows, whose ratio is the sample), largest first; only rows whose bias entry is read take part."""
    live = np.flatnonzero(berr < RELIABLE * np.abs(b))
    if len(live) < 2:
        return []
    R = G[live] / b[live, None]
    ok = Gerr[live] < RELIABLE * np.abs(G[live])
    scale = np.abs(R)
    linked = np.zeros((len(live), len(live)), bool)
    for a in range(len(live)):
        both = ok[a][None] & ok
        close = np.abs(R[a][None] - R) <= 2 * SAME_SAMPLE * (scale[a][None] + scale + 0.05)
        shared = both.sum(1)
        agree = (close & both).sum(1) / np.maximum(shared, 1)
        linked[a] = (agree >= 0.8) & (shared >= 0.05 * G.shape[1])
    linked &= linked.T
    np.fill_diagonal(linked, True)
    _, comp = connected_components(linked, directed=False)
    sizes = np.bincount(comp)
    return [live[comp == c] for c in np.argsort(-sizes, kind="stable") if sizes[c] >= 2]


def _sign_groups(S: np.ndarray, rows: np.ndarray, agree: float | None = None) -> list[np.ndarray]:
    """Groups of rows with (nearly) one sign pattern, densest first: a sample's sole rows all carry
    ``sign(x_i)`` (times their error's sign, which the bias entry gives) but for a few entries the weight
    decay flips (2% of them, or 2 entries of a short input: ``agree``); rows mixing samples differ more."""
    if len(rows) < 2:
        return []
    if agree is None:
        agree = 1.0 - max(0.02, 2.5 / S.shape[1])
    P = S[rows]
    A = P @ P.T / P.shape[1]
    close = agree <= A
    density = close.sum(1)
    groups, taken = [], np.zeros(len(rows), bool)
    for j in np.argsort(-density, kind="stable"):
        if density[j] < 2:
            break
        if taken[j]:
            continue
        members = close[j] & ~taken
        if members.sum() < 2:
            continue
        taken |= members
        groups.append(rows[members])
    return groups


def _errors_by_label(params: dict[str, np.ndarray], x: np.ndarray, n_classes: int) -> np.ndarray:
    """``(classes, hidden)``: the sample's first-layer backpropagated error for each candidate label."""
    model = model_at(params, 0.0).double()
    xt = torch.as_tensor(x, dtype=torch.float64)[None].repeat(n_classes, 1)
    pre = model.dense1(xt).detach().requires_grad_(True)
    out = model.out(torch.relu(model.dense2(torch.relu(pre))))
    loss = torch.nn.functional.cross_entropy(out, torch.arange(n_classes), reduction="sum")
    (err,) = torch.autograd.grad(loss, pre)
    return err.numpy()


#: What a sign-only sample's entries are set to: E|x| of a standard normal feature given its sign (the
#: protocol z-normalises each speaker's features), where the update keeps no magnitude.
SIGN_MAGNITUDE = float(np.sqrt(2 / np.pi))


def reads_magnitude(settings: LocalSettings, num_examples: int) -> bool:
    """Whether the update keeps the inputs' magnitudes: SGD always (its update is a sum of gradients);
    Adam only for a client that takes one local step (its eps leaves ``|g|`` in the rounding); after several
    Adam steps each entry's move is set by how the row's error changed between steps, and only signs are read."""
    return settings.optimizer == "sgd" or settings.steps(num_examples) == 1


def invert_fedavg(delta: dict[str, np.ndarray], params: dict[str, np.ndarray], num_examples: int,
                  settings: LocalSettings, *, refine_steps: int = 0, n_classes: int = 4) -> Recovered:
    """Recover the utterances (and emotions) behind one FedAvg update (see the module's docstring).

    Rows whose weight/bias ratios agree group into samples (:func:`_ratio_groups`), then rows with one sign
    pattern among the rest (:func:`_sign_groups`); groups come largest first, one per sample (a group within
    cosine 0.95 of an earlier one is the same sample), at most ``num_examples``. Each sample is its rows'
    median ratio (:func:`_sample_from_rows`) where :func:`reads_magnitude`, else its sign pattern times
    :data:`SIGN_MAGNITUDE` (``info["magnitude"]`` says which). ``refine_steps > 0`` then runs :func:`refine`.
    """
    steps = settings.steps(num_examples)
    W, bvec = np.asarray(delta["dense1.weight"], np.float64), np.asarray(delta["dense1.bias"], np.float64)
    est = gradient_estimate({"dense1.weight": W, "dense1.bias": bvec}, params, settings, steps)
    G, Gerr = est.value["dense1.weight"], est.error["dense1.weight"]
    b, berr = est.value["dense1.bias"], est.error["dense1.bias"]
    magnitude = reads_magnitude(settings, num_examples)
    if settings.optimizer == "adam":  # a unit no sample reached moves by weight decay alone: every entry along -theta's sign
        live = np.flatnonzero((np.sign(W) != np.sign(np.asarray(params["dense1.weight"], np.float64))).any(1))
    else:
        live = np.flatnonzero(np.abs(b) > 0)
    # the sign pattern as the update shows it (the estimate's weight-decay correction can flip small entries)
    S = (np.sign(G) * np.sign(b)[:, None]) if magnitude else (np.sign(W) * np.sign(bvec)[:, None])
    groups = _ratio_groups(G, Gerr, b, berr) if magnitude else []
    grouped = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    groups += _sign_groups(S, np.setdiff1d(live, grouped))
    def sample(rows: np.ndarray) -> np.ndarray:
        if magnitude:
            return _sample_from_rows(G, Gerr, b, berr, rows)
        return SIGN_MAGNITUDE * np.sign(S[rows].sum(0) + 1e-9 * S[rows[0]])

    # a sample's own rows are units it activates at the global model: a group of mixed rows whose ratios
    # happen to agree gives an input that leaves many of them off, and is dropped
    W1, b1 = np.asarray(params["dense1.weight"], np.float64), np.asarray(params["dense1.bias"], np.float64)
    least_active = ACTIVE_SHARE if magnitude else SIGN_ACTIVE_SHARE
    xs: list[np.ndarray] = []
    rows_of: list[np.ndarray] = []
    for rows in groups:
        if len(rows) < MIN_ROWS:  # two rows agree by chance too often (measured on EmoDB: most such samples are wrong)
            continue
        x = sample(rows)
        if not np.isfinite(x).all() or np.sqrt(np.mean(x ** 2)) > MAX_RMS:
            continue  # a near-zero bias entry's ratio: not a z-normalised utterance
        if np.mean(W1[rows] @ x + b1[rows] > 0) < least_active:
            continue
        same = [i for i, o in enumerate(xs) if np.dot(x, o) / (np.linalg.norm(x) * np.linalg.norm(o) + 1e-30) > 0.95]
        if same:  # another group of a sample already found: its rows join
            i = same[0]
            rows_of[i] = np.union1d(rows_of[i], rows)
            xs[i] = sample(rows_of[i])
            continue
        xs.append(x)
        rows_of.append(rows)
        if len(xs) == num_examples:  # groups whose ratios agree come first (their scale is read), then sign groups
            break
    labels = []
    for x, rows in zip(xs, rows_of):
        E = _errors_by_label(params, x, n_classes)[:, rows]  # each candidate label's error on the sample's rows
        obs = b[rows]  # the rows' bias entries: the sample's error there, summed over the steps (sign: Adam's)
        cos = E @ obs / (np.linalg.norm(E, axis=1) * np.linalg.norm(obs) + 1e-30)
        labels.append(int(np.argmax(cos)))
    X = np.array(xs, dtype=np.float64).reshape(len(xs), G.shape[1])
    rec = Recovered(inputs=X, labels=np.array(labels, dtype=np.int64), certificates=np.zeros(len(xs)),
                    batch_size=num_examples, info={"row_groups": len(groups), "sole_rows": [len(r) for r in rows_of],
                                                   "magnitude": magnitude,
                                                   "read_share": float(est.reliable("dense1.weight").mean())})
    if refine_steps > 0 and len(xs):
        rec = refine(rec, delta, params, settings, steps=refine_steps)
    return rec


def _matching_space(delta: dict[str, torch.Tensor], settings: LocalSettings, steps: int) -> dict[str, torch.Tensor]:
    """What is compared: Adam: ``sign * -log(1 - r)`` (the log-magnitude Adam's eps leaves: ``log1p(|g| / eps)``
    for one step), SGD: the pseudo-gradient."""
    if settings.optimizer == "sgd":
        return {k: v / settings.lr for k, v in delta.items()}
    step = settings.lr * steps
    return {k: torch.sign(v) * -torch.log1p(-(v.abs() / step).clamp(max=1 - 1e-12)) for k, v in delta.items()}


def refine(rec: Recovered, delta: dict[str, np.ndarray], params: dict[str, np.ndarray], settings: LocalSettings, *,
           steps: int = 200, lr: float = 0.01, seed: int = 0) -> Recovered:
    """Gradient matching through the unrolled local training (Dimitrov et al., TMLR 2022), from ``rec``.

    The client's round is replayed in float64 with the optimiser's own rule at the clients' eps
    (:class:`~attacks.inference.simulate.Unroll`), on the recovered inputs (rows the inversion missed
    start at zero), their labels held, and the dropout masks relaxed to ``sigmoid`` multipliers per
    sample and unit (the client's masks are unknown). Loss: squared residual in the matching space
    (:func:`_matching_space`) on the entries whose magnitude the update reveals, plus a hinge on the sign of
    the others; the inputs and masks follow Adam. Only the rows ``rec`` holds are returned.
    """
    torch.manual_seed(seed)
    n = rec.batch_size
    d = rec.inputs.shape[1]
    T = settings.steps(n)
    est = gradient_estimate(delta, params, settings, T)
    unroll = Unroll({k: np.asarray(v, dtype=np.float64) for k, v in params.items()}, settings)
    unroll.model.double()
    unroll.theta = [t.double() for t in unroll.theta]
    obs = _matching_space({k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in delta.items()}, settings, T)
    weights = {}
    for k in obs:
        rel = torch.as_tensor(est.error[k] < RELIABLE * np.abs(est.value[k]))
        weights[k] = rel
    X0 = np.zeros((n, d))
    X0[: len(rec.inputs)] = rec.inputs
    y0 = np.zeros(n, dtype=np.int64)
    y0[: len(rec.labels)] = rec.labels
    Xh = torch.tensor(X0, requires_grad=True)
    Y = torch.nn.functional.one_hot(torch.as_tensor(y0), 4).double()
    hidden = unroll.model.dense1.out_features
    mask_logit = torch.full((n, hidden), 3.0, dtype=torch.float64, requires_grad=True)
    p = settings.dropout
    opt = torch.optim.Adam([Xh, mask_logit], lr=lr)
    batches = settings.batches(n)
    for _ in range(steps):
        opt.zero_grad()
        keep = torch.sigmoid(mask_logit) / (1.0 - p) if p > 0 else None
        sim = unroll.delta(Xh, Y, keep=None if keep is None else [keep[torch.as_tensor(r)] for r in batches])
        sim_m = _matching_space(sim, settings, T)
        loss = torch.zeros((), dtype=torch.float64)
        for k in obs:
            w = weights[k]
            res = (sim_m[k] - obs[k])[w]
            loss = loss + res.pow(2).mean() if w.any() else loss
            loss = loss + torch.relu(-torch.sign(obs[k][~w]) * sim_m[k][~w]).mean() if (~w).any() else loss
        loss.backward()
        opt.step()
    # the rows the inversion had found, moved; the rows it had missed take part in the replay (the client trained
    # on n rows) but start at zero with a guessed label, and are not returned
    X = Xh.detach().numpy()[: len(rec.inputs)]
    return Recovered(inputs=X, labels=rec.labels.copy(), certificates=rec.certificates.copy(), batch_size=n,
                     info={**rec.info, "refined": steps})
