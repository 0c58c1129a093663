"""Exact reconstruction of a client's batch from its FedSGD update (dense layers with ReLU).

The server that eavesdrops on FedSGD knows the global model it sent. For the SER model
``x -> relu(W1 x + b1) -> dropout -> relu(W2 h + b2) -> W3 a + b3`` the first layer's gradient is

    G1 = [dL/dW1, dL/db1] = (1/B) sum_i delta_i [x_i; 1]^T         (units x (inputs + 1))

with ``delta_i`` the backpropagated error of sample ``i`` at the first layer's pre-activation. It
vanishes on every unit sample ``i`` leaves inactive or drops. In the ``B``-dimensional row space
of ``G1`` (coordinates ``a``, ``[x_i; 1] = V a_i``) every unit's row is therefore orthogonal to the
normal ``q_i`` of the hyperplane spanned by the other samples whenever sample ``i`` is zero there:
each sample is a hyperplane holding about half of the 256 rows. The reconstruction:

1. **Normals.** A row that one sample dominates, divided by its bias entry, lands in that sample's
   activation cell; the rows its pattern leaves inactive give the sample's normal as their null
   vector. Samples no row dominates are found by RANSAC over ``B - 1`` rows. Found samples are
   subtracted from the gradient (deflation), so that the rest dominate rows of the residual; a pass
   whose RANSAC stalls (``stall`` draws without another sample) deflates what it has, and one over a
   residual that finds nothing gives up after ``give_up`` draws. What the passes
   leave is searched in the undeflated gradient, projected away from the found samples (whose
   coordinates are exact once certified): there the rows hold the missing samples' terms alone,
   without the errors that subtractions add, and a last missing sample needs no search at all.
2. **Certificate and exact input.** The second layer's gradient ``G2 = (1/B) sum_i delta2_i h_i^T``
   has the post-dropout activations ``h_i = 1[S_i] relu(W1 x_i + b1) / (1 - p)`` as its row
   space, where ``S_i`` (active and kept units) is read off the normal: the units whose rows are not
   orthogonal to ``q_i``. So ``x_i`` is the one direction of the first layer's row space whose
   masked activation lies in ``G2``'s row space: the null vector of a ``256 x B`` system. A true
   normal gives a null space at float32 rounding (~1e-7); a spurious one (a mixture of two
   samples' normals) leaves a residual of order 0.1: the certificate rejects it, per sample, without
   needing the others.
3. **Label.** With ``x_i`` and its dropout mask known, the forward pass gives ``p_i``; of the four
   candidate labels, the one whose backpropagated error points along ``delta_i`` is the label.
   With every sample recovered, the output bias gradient gives the batch's label counts exactly
   (``n_c = sum_i p_ic - B dL/db3_c``).

Nothing here knows about Flower or the update store: inputs are the update's and the global
model's arrays (``dense1.weight`` ...). What it needs of the protocol (white box, as the paper's
attacker): the batch size and the dropout rate. Under DP-FedSGD's noise or Adam's elementwise
normalisation (FedAvg) the structure is gone and the certificates fail: nothing is recovered,
which the caller reports as such.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

#: A certified sample's residual is at float32 rounding (1e-7 to 1e-4 for very confident samples,
#: whose errors are tiny); a spurious normal's is ~0.3. The threshold sits between, with margin.
CERTIFICATE = 1e-3
#: Rows of the normalised first-layer gradient closer than this to a hyperplane lie on it.
ON_PLANE = 1e-6  # at least; each row's tolerance grows with the gradient's noise floor
#: Beyond the batch size, a per-sample sum's spectrum is float32 rounding (~1e-8 of the largest
#: singular value); anything above this is another kind of update.
LOW_RANK = 1e-5


@dataclass
class Recovered:
    """What the inversion read from one update."""

    inputs: np.ndarray  # (m, d): the recovered input rows
    labels: np.ndarray  # (m,): label per row (its backpropagated error's direction)
    certificates: np.ndarray  # (m,): second-layer residual of each row (~1e-7: exact)
    batch_size: int  # B: how many samples the update holds
    label_counts: np.ndarray | None = None  # (classes,): from the output layer, when all B were recovered
    draws: int = 0  # RANSAC draws spent, over every pass
    info: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.inputs) == self.batch_size


class _Layers:
    """The global model's weights as float64 arrays, and its forward pass with a given mask."""

    def __init__(self, params: dict[str, np.ndarray], dropout: float):
        self.W1 = np.concatenate([params["dense1.weight"], params["dense1.bias"][:, None]], 1).astype(np.float64)
        self.W2, self.b2 = params["dense2.weight"].astype(np.float64), params["dense2.bias"].astype(np.float64)
        self.W3, self.b3 = params["out.weight"].astype(np.float64), params["out.bias"].astype(np.float64)
        self.keep = 1.0 / (1.0 - dropout)

    def forward(self, x: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax output and the second layer's pre-activation for input ``[x; 1]`` and kept units."""
        h = np.where(kept, np.maximum(self.W1 @ x, 0.0) * self.keep, 0.0)
        z2 = self.W2 @ h + self.b2
        logits = self.W3 @ np.maximum(z2, 0.0) + self.b3
        p = np.exp(logits - logits.max())
        return p / p.sum(), z2

    def error(self, p: np.ndarray, z2: np.ndarray, kept: np.ndarray, label: int) -> np.ndarray:
        """The first layer's backpropagated error of one sample with this label (up to 1/B)."""
        e = p.copy()
        e[label] -= 1.0
        d2 = (self.W3.T @ e) * (z2 > 0)
        return (self.W2.T @ d2) * kept * self.keep


class _Frame:
    """A rank-``r`` (residual) first-layer gradient ``U diag(S) V^T`` in its row space, beside the
    second layer's row space ``R2``."""

    def __init__(self, U: np.ndarray, S: np.ndarray, V: np.ndarray, noise: float, R2: np.ndarray):
        self.V, self.r = V, len(S)  # V: (inputs + 1) x r
        self.P = P = U * S  # the gradient's rows in row-space coordinates; P @ q_i is sample i's error
        norms = np.linalg.norm(P, axis=1)
        # how far from a plane a row on it may seem: float32 rounding (and, after deflation, the
        # error of what was subtracted), as a spectral norm spread over the rows
        spread = noise * np.sqrt(self.r) / (np.sqrt(len(P)) + np.sqrt(len(V)))
        self.tol = np.maximum(ON_PLANE, 10 * spread / np.maximum(norms, 1e-300))
        # a row whose direction the noise could turn (a unit only removed samples used) says nothing;
        # after deflation such rows sit decades below the rest: a gap of more than 2 decades in the
        # row norms separates them even where the spectrum underestimates the subtraction's error
        self.live = (norms > max(1e-6 * norms.max(), _norm_gap(norms))) & (self.tol < 1e-3)
        self.W = np.zeros_like(P)
        self.W[self.live] = P[self.live] / norms[self.live, None]  # unit rows; the others stay 0
        self.R2 = R2  # 256 x B: span of the whole batch's post-dropout activations
        self.W1V: np.ndarray | None = None  # the first layer's pre-activation as a function of a

    def pre_activation(self, layers: _Layers) -> np.ndarray:
        """``W1 V``: the first layer's pre-activation as a function of the row-space coordinates ``a``
        (computed once per frame)."""
        if self.W1V is None:
            self.W1V = layers.W1 @ self.V
        return self.W1V


def _norm_gap(norms: np.ndarray, decades: float = 2.0) -> float:
    """A threshold in the widest gap (if wider than ``decades``) of the log row norms, else 0."""
    logs = np.sort(np.log10(norms[norms > 0]))
    if len(logs) < 2:
        return 0.0
    gaps = np.diff(logs)
    k = int(np.argmax(gaps))
    return float(10 ** (logs[k] + gaps[k] / 2)) if gaps[k] > decades else 0.0


def _thin_svd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.linalg.svd(A, full_matrices=False)`` of a wide ``A`` (m < n) through the QR of ``A^T``.

    The SVD then runs on an ``m x m`` triangle instead of the ``m x n`` gradient (256 x 989 for the
    first layer), less work for LAPACK's divide and conquer, and just as accurate (QR is backward
    stable; the singular values agree to ~1e-15 of the largest).
    """
    if A.shape[0] >= A.shape[1]:
        return np.linalg.svd(A, full_matrices=False)
    q, tri = np.linalg.qr(A.T)  # A = tri^T q^T
    u, s, vt = np.linalg.svd(tri.T)
    return u, s, vt @ q.T


def _right_vectors(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values and right singular vectors of a stack of tall ``A`` (..., m, r): the SVD of
    each ``r x r`` triangle of its QR (the same values and vectors, for less work than the SVD of each tall matrix)."""
    tri = np.linalg.qr(A, mode="r")
    _, s, vt = np.linalg.svd(tri)
    return s, vt


def _normals_of(W: np.ndarray, rows: np.ndarray) -> list[np.ndarray | None]:
    """The unit normal of the hyperplane through ``W[rows_k]`` for each mask ``rows_k`` of ``rows``
    (n x units); None where fewer than ``r - 1`` rows are given. Zeroed rows leave the right
    singular vectors as removed rows would, so one stacked factorisation serves every mask."""
    r = W.shape[1]
    out: list[np.ndarray | None] = [None] * len(rows)
    ok = np.flatnonzero(rows.sum(1) >= r - 1)
    if len(ok):
        _, vt = _right_vectors(np.where(rows[ok, :, None], W[None], 0.0))
        for k, q in zip(ok, vt[:, -1]):
            out[k] = q
    return out


def _normals_worth_certifying(frame: _Frame, layers: _Layers, W: np.ndarray, rows: np.ndarray,
                              C: np.ndarray | None = None) -> list[np.ndarray | None]:
    """:func:`_normals_of` ``(W, rows)``, but None also where the plane's sample would certainly fail
    the certificate in ``frame`` (``C``: ``W``'s coordinates in ``frame``'s, for the rescue's projection).

    Most candidate planes are no sample's, late in training nearly all. Their normals are first taken
    from each mask's ``r x r`` Gram matrix (one matrix product for every mask, then its smallest
    eigenvector: cheaper than the stacked QR + SVD, and equal to it to ~1e-14 where the rows are
    coplanar), and screened (:func:`_may_certify`) with the units they keep; only the planes that pass
    get their normals exactly, by :func:`_normals_of`, and are certified.
    """
    r = W.shape[1]
    ok = np.flatnonzero(rows.sum(1) >= r - 1)
    if not len(ok) or frame.r == 1:
        return _normals_of(W, rows)
    out: list[np.ndarray | None] = [None] * len(rows)
    gram = (rows[ok].astype(np.float64) @ (W[:, :, None] * W[:, None, :]).reshape(len(W), r * r)).reshape(len(ok), r, r)
    approx = np.linalg.eigh(gram)[1][:, :, 0]
    if C is not None:
        approx = approx @ C.T
    frame.pre_activation(layers)
    worth = ok[_may_certify(frame, frame.live & (np.abs(approx @ frame.W.T) >= frame.tol))]
    for k, q in zip(worth, _normals_of(W, rows[worth]) if len(worth) else []):
        out[k] = q
    return out


def _certify_many(frame: _Frame, layers: _Layers, Q: np.ndarray) -> list[tuple[float, np.ndarray | None, np.ndarray]]:
    """(residual, [x; 1], kept units) of the sample behind each normal (row) of ``Q``. Masks the screen
    (:func:`_may_certify`) rules out get residual ``inf`` and no input (None); the rest are certified
    in one stacked factorisation."""
    kept = frame.live & (np.abs(Q @ frame.W.T) >= frame.tol)  # (n, units)
    frame.pre_activation(layers)
    out: list[tuple[float, np.ndarray | None, np.ndarray]] = [(np.inf, None, k) for k in kept]
    hope = _may_certify(frame, kept) if frame.r > 1 else np.ones(len(kept), dtype=bool)
    idx = np.flatnonzero(hope)
    for k, c in zip(idx, _certify_exact(frame, kept[idx]) if len(idx) else []):
        out[k] = c
    return out


#: What :func:`_may_certify` lets through: a certificate above this is certainly no sample's (10x
#: :data:`CERTIFICATE`, so that the Gram matrix's rounding, bounded below, cannot cross it).
SCREEN = 10 * CERTIFICATE


def _may_certify(frame: _Frame, kept: np.ndarray) -> np.ndarray:
    """Whether each mask of ``kept`` (n x units) may give a certificate below :data:`CERTIFICATE`: a
    screen that rejects only what the exact certificate would reject.

    The certificate is the ratio of the extreme singular values of ``O = (I - R2 R2^T) K`` with ``K``
    the masked pre-activation (units x r). Its squares are the extreme eigenvalues of the ``r x r``
    Gram matrix ``O^T O = K^T K - (R2^T K)^T (R2^T K)``, and ``K^T K`` and ``R2^T K`` are linear in the
    mask: for every mask at once they are two matrix products with the units' outer products, with no
    ``units x r`` matrix formed and factorised per mask; most masks are spurious planes, and few pass
    (benchmarks/README.md says how few). The Gram matrix loses the digits the exact certificate keeps
    (float64 rounding of ``K^T K`` is ~1e-16 of its trace, which the subtraction does not shrink); so
    a mask is rejected only where the largest eigenvalue is above 1e-6 of that trace (the rounding
    then moves the ratio by ~1e-10) and the ratio of the squares above ``SCREEN^2``: its certificate
    is then above ~1e-2, 10x the threshold. The rest are certified exactly (:func:`_certify_exact`),
    with the same arithmetic as without the screen.
    """
    W1V, R2, r = frame.W1V, frame.R2, frame.r
    m = kept.astype(np.float64)
    KtK = (m @ (W1V[:, :, None] * W1V[:, None, :]).reshape(len(W1V), r * r)).reshape(len(m), r, r)
    RtK = (m @ (R2[:, :, None] * W1V[:, None, :]).reshape(len(W1V), -1)).reshape(len(m), R2.shape[1], r)
    lam = np.linalg.eigvalsh(KtK - np.swapaxes(RtK, 1, 2) @ RtK)  # ascending
    trustworthy = lam[:, -1] > 1e-6 * np.trace(KtK, axis1=1, axis2=2)
    return ~(trustworthy & (lam[:, 0] > SCREEN**2 * lam[:, -1]))


def _certify_exact(frame: _Frame, kept: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(residual, [x; 1], kept units) for each mask of ``kept``: one stacked factorisation of the masked
    pre-activations' parts outside the second layer's row space."""
    K = np.where(kept[:, :, None], frame.W1V[None], 0.0)  # masked pre-activation as a function of a
    outside = K - frame.R2 @ (frame.R2.T @ K)  # the part outside G2's row space must vanish
    s, vt = _right_vectors(outside)
    X = vt[:, -1] @ frame.V.T
    out = []
    for k, x in enumerate(X):
        if abs(x[-1]) < 1e-12:  # no bias entry: not [x; 1] of any sample (a saturated model's update)
            out.append((np.inf, x, kept[k]))
        elif frame.r == 1:  # one direction: it is the sample's if its masked activation lies in G2's row space
            out.append((float(s[k, 0] / (np.linalg.norm(K[k]) + 1e-300)), x / x[-1], kept[k]))
        else:
            out.append((float(s[k, -1] / s[k, 0]), x / x[-1], kept[k]))
    return out


def _certify(frame: _Frame, layers: _Layers, q: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray]:
    """(residual, [x; 1], kept units) of the sample whose normal is ``q``."""
    return _certify_many(frame, layers, q[None])[0]


def _null_vectors(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit null vector of each ``(r - 1) x r`` matrix of the stack ``A``, the last column of the
    complete QR of ``A^T``, and the smallest diagonal entry of its triangle in magnitude: an upper
    bound of the smallest singular value that vanishes with it (rows that do not span ``r - 1``
    dimensions leave no unique normal): cheaper than the singular values themselves."""
    q, tri = np.linalg.qr(np.swapaxes(A, 1, 2), mode="complete")
    return np.abs(np.diagonal(tri[:, : A.shape[1], :], axis1=1, axis2=2)).min(1), q[:, :, -1]


def _ransac_planes(W: np.ndarray, tol: np.ndarray, rng: np.random.Generator, draws: int, found: list[np.ndarray],
                   batch: int = 500) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Hyperplanes through ``r - 1`` random rows that many rows lie on (normals to refine and certify),
    ``batch`` draws at a time: (draws so far, the candidate normals, the rows on each; none, often).

    Rows are drawn with weights that grow with how many of the samples found so far are zero on
    them: a unit inactive for most samples is likely inactive for the missing ones too.
    """
    rows = np.flatnonzero(np.linalg.norm(W, axis=1) > 0)
    r = W.shape[1]
    min_count = max(r + 2, int(0.25 * len(rows)))
    if len(rows) < min_count:  # too few rows the noise leaves a direction: no plane can be trusted
        return
    for start in range(0, draws, batch):
        weight = np.ones(len(rows))
        if found:
            weight = np.mean([np.abs(W[rows] @ q) < tol[rows] for q in found], 0) ** 2 + 0.05
        # r - 1 distinct rows per draw, with these weights: the smallest exponential keys (vectorised)
        keys = rng.exponential(size=(batch, len(rows))) / weight
        pick = rows[np.argpartition(keys, r - 2, axis=1)[:, : r - 1]]
        span, q = _null_vectors(W[pick])
        on = np.abs(W @ q.T) < tol[:, None]
        planes = np.flatnonzero((span > 1e-5) & (on.sum(0) >= min_count))
        yield start + batch, q[planes], on[:, planes].T


@dataclass
class _Sample:
    certificate: float
    x: np.ndarray  # [x; 1]
    kept: np.ndarray  # active and kept units
    error: np.ndarray  # its backpropagated error over units, up to scale


#: Phase 1 of the search tries rows in chunks of this many: their normals and certificates come from
#: one stacked factorisation each, and are then accepted one by one in the rows' order (as if tried
#: singly); what a chunk computes past the last sample needed is the price.
CHUNK = 32


class _Rows:
    """A growing stack of unit vectors, and whether one is within ``tol`` of any (up to sign)."""

    def __init__(self, dim: int):
        self._a, self._n = np.empty((16, dim)), 0

    @property
    def rows(self) -> np.ndarray:
        return self._a[: self._n]

    def append(self, q: np.ndarray) -> None:
        if self._n == len(self._a):
            self._a = np.concatenate([self._a, np.empty_like(self._a)])
        self._a[self._n] = q
        self._n += 1

    def near(self, q: np.ndarray, tol: float) -> bool:
        return self._n > 0 and float(np.abs(self.rows @ q).max()) > 1 - tol

    def near_many(self, Q: np.ndarray, tol: float) -> np.ndarray:
        """:meth:`near` for each row of ``Q``, in one product."""
        if self._n == 0:
            return np.zeros(len(Q), dtype=bool)
        return np.abs(Q @ self.rows.T).max(1) > 1 - tol


def _is_new(cert: float, x: np.ndarray | None, others: list[_Sample]) -> bool:
    """Whether ``[x; 1]`` with this certificate is an exact sample none of ``others`` already holds."""
    if not cert < CERTIFICATE or x is None:
        return False
    scale = np.abs(x).max()
    return not any(np.abs(x - o.x).max() <= 1e-4 * scale for o in others)


class _Search:
    """One pass over a (residual) gradient in ``frame``: the samples found so far (beside ``known``, found
    in earlier passes), their normals, and the activation cells and planes' rows already tried (each
    is tried once). Its two phases are :meth:`dominated_rows` and :meth:`planes`."""

    def __init__(self, frame: _Frame, layers: _Layers, known: list[_Sample]):
        self.frame, self.layers, self.known = frame, layers, known
        self.found: list[_Sample] = []
        self.normals = _Rows(frame.r)  # of the found samples, in order
        self.tried: set[bytes] = set()

    @property
    def done(self) -> bool:
        return len(self.found) == self.frame.r

    def seen(self, q: np.ndarray, tol: float = 1e-6) -> bool:
        """Known already: within ``tol`` of a found normal."""
        return self.normals.near(q, tol)

    def accept(self, q: np.ndarray | None, certified: tuple | None = None) -> None:
        """Keep the sample behind normal ``q`` (certified here unless ``certified`` is given) if it is a new exact one."""
        if q is None or self.seen(q):
            return
        cert, x, kept = certified or _certify(self.frame, self.layers, q)
        if _is_new(cert, x, self.known + self.found):
            self.found.append(_Sample(cert, x, kept, self.frame.P @ q))
            self.normals.append(q)

    def _untried(self, masks: Iterable[np.ndarray]) -> list[int]:
        """The indices of ``masks`` (rows of units) not tried before, now marked tried."""
        out = []
        for k, mask in enumerate(masks):
            if (key := np.packbits(mask).tobytes()) not in self.tried:
                self.tried.add(key)
                out.append(k)
        return out

    def dominated_rows(self) -> None:
        """Phase 1: rows a sample dominates. The row over its bias entry lands in that sample's activation
        cell, whose inactive units give the sample's normal; rows are tried by decreasing bias entry,
        :data:`CHUNK` at a time, and accepted in that order."""
        frame, layers = self.frame, self.layers
        bias = np.abs(frame.P @ frame.V[-1])
        order = np.argsort(-bias, kind="stable")
        order = order[(bias[order] > 1e-6 * bias.max()) & frame.live[order]]
        for start in range(0, len(order), CHUNK):
            if self.done:
                break
            X = frame.P[order[start:start + CHUNK]] @ frame.V.T
            with np.errstate(divide="ignore", invalid="ignore"):  # a row without bias entry has an empty cell
                inactive = ((X / X[:, -1:]) @ layers.W1.T < 0) & frame.live
            cells = [inactive[k] for k in self._untried(inactive)]  # one activation cell, one try
            if not cells:
                continue
            qs = _normals_worth_certifying(frame, layers, frame.W, np.array(cells))
            fresh = [k for k, q in enumerate(qs) if q is not None and not self.seen(q)]
            certified = dict(zip(fresh, _certify_many(frame, layers, np.array([qs[k] for k in fresh])))) if fresh else {}
            for k, q in enumerate(qs):
                if self.done:
                    break
                if k in certified:
                    self.accept(q, certified[k])

    def planes(self, rng: np.random.Generator, ransac_draws: int, stall: int, give_up: int) -> int:
        """Phase 2: the rest, as hyperplanes that many rows lie on (RANSAC, :func:`_ransac_planes`); the draws
        spent. Each batch's planes are refined and certified in stacked factorisations, then accepted in
        the draws' order (late in training a batch holds hundreds of spurious planes, each certified and
        rejected). ``stall`` and ``give_up``: see :func:`_search`."""
        frame, layers = self.frame, self.layers
        draws = last = 0
        for spent, Q, on in _ransac_planes(frame.W, frame.tol, rng, ransac_draws, list(self.normals.rows)):
            draws, before = spent, len(self.found)
            new_planes = np.flatnonzero(~self.normals.near_many(Q, 1e-3))
            todo = [new_planes[k] for k in self._untried(on[new_planes])]
            refined = _normals_worth_certifying(frame, layers, frame.W, on[todo])
            fresh = [k for k, q in enumerate(refined) if q is not None and not self.seen(q)]
            if fresh:
                for k, cert in zip(fresh, _certify_many(frame, layers, np.array([refined[k] for k in fresh]))):
                    self.accept(refined[k], cert)
                    if self.done:
                        break
            if self.done:
                break
            last = spent if len(self.found) > before else last
            if stall and self.found and spent - last >= stall:
                break
            if give_up and self.known and not self.found and spent >= give_up:
                break
        return draws


def _search(frame: _Frame, layers: _Layers, known: list[_Sample], rng: np.random.Generator,
            ransac_draws: int, stall: int = 0, give_up: int = 0) -> tuple[list[_Sample], int]:
    """Certified samples of the (residual) gradient in ``frame``, and the RANSAC draws spent: the rows a
    sample dominates first (:meth:`_Search.dominated_rows`), then RANSAC for the rest
    (:meth:`_Search.planes`). With ``stall``, a search that has found a sample stops after ``stall``
    draws without another: the caller deflates what it found, and the samples left then dominate rows
    of the residual. With ``give_up``, a search of a residual (``known`` samples already subtracted)
    that has found nothing stops after ``give_up`` draws: the caller then searches the undeflated
    gradient (:func:`_rescue`)."""
    search = _Search(frame, layers, known)
    if frame.r == 1:  # one sample left: the residual is its rank-1 term
        search.accept(np.ones(1))
        return search.found, 0
    search.dominated_rows()
    draws = search.planes(rng, ransac_draws, stall, give_up) if not search.done and ransac_draws > 0 else 0
    return search.found, draws


def _rescue(whole: _Frame, layers: _Layers, samples: list[_Sample], rng: np.random.Generator, ransac_draws: int,
            stall: int) -> tuple[list[_Sample], int]:
    """The samples the residual passes left, searched in the undeflated gradient ``whole``.

    A missing sample's normal is orthogonal to every other sample's coordinates ``V^T [x; 1]``, so it
    lies in the complement ``C`` of the found samples' coordinates (known exactly once certified).
    There the gradient's rows ``P C`` are the missing samples' terms alone, without the errors that
    each deflation's subtraction adds: hyperplanes through ``m - 1`` of them (``m`` samples missing)
    are drawn as in the residual, and certified in ``whole``. With one sample missing its normal is
    ``C`` itself: no search.
    """
    found: list[_Sample] = []
    draws = 0
    while len(samples) + len(found) < whole.r:
        A = np.array([whole.V.T @ smp.x for smp in samples + found])
        C = np.linalg.svd(A)[2][len(A):].T  # r x m, orthonormal
        if C.shape[1] == 1:
            certified, spent = [(C[:, 0], _certify(whole, layers, C[:, 0]))], 0
        else:
            Y = whole.P @ C
            norms, rows = np.linalg.norm(Y, axis=1), np.linalg.norm(whole.P, axis=1)
            # a row's projection carries the rounding of the whole row, and of the found coordinates
            err = whole.tol * rows / 10 + 1e-6 * rows
            tol = np.maximum(ON_PLANE, 10 * err / np.maximum(norms, 1e-300))
            live = (norms > 1e-6 * norms.max()) & (tol < 1e-3)
            Wy = np.zeros_like(Y)
            Wy[live] = Y[live] / norms[live, None]
            certified, spent = _first_certified_planes(whole, layers, Wy, tol, C, rng, ransac_draws, stall)
        draws += spent
        before = len(found)
        for q, (cert, x, kept) in certified:
            if _is_new(cert, x, samples + found):
                found.append(_Sample(cert, x, kept, whole.P @ q))
        if len(found) == before:
            break
    return found, draws


def _first_certified_planes(whole: _Frame, layers: _Layers, Wy: np.ndarray, tol: np.ndarray, C: np.ndarray,
                            rng: np.random.Generator, ransac_draws: int, stall: int) -> tuple[list, int]:
    """(normal in ``whole``'s coordinates, its certificate) of each projected plane of the first batch of
    draws that holds a certified sample, or none after ``ransac_draws`` (``stall``: this many) draws;
    and the draws spent."""
    spent = 0
    for spent, _, on in _ransac_planes(Wy, tol, rng, ransac_draws, []):
        refined = [q for q in _normals_worth_certifying(whole, layers, Wy, on, C) if q is not None]
        if refined:
            Qw = np.array(refined) @ C.T
            ok = [(q, c) for q, c in zip(Qw, _certify_many(whole, layers, Qw)) if c[0] < CERTIFICATE]
            if ok:
                return ok, spent
        if stall and spent >= stall:
            break
    return [], spent


def _deflate(U: np.ndarray, S: np.ndarray, V: np.ndarray, samples: list[_Sample], rank: int):
    """The factorisation of ``U diag(S) V^T`` without the rank-1 terms of ``samples``, and the size of
    what is left beyond ``rank`` (the subtraction's error).

    Each term is ``c d x^T`` with ``d`` the sample's error and ``x`` its input, both inside the
    factorisation's spans; ``c`` is the one scale that makes the rest singular. All of it happens in
    ``r x r`` coordinates.
    """
    M = np.diag(S)
    for k in range(len(S), len(S) - len(samples), -1):  # M has rank k before each subtraction
        smp = samples[len(S) - k]
        u, a = U.T @ smp.error, V.T @ smp.x
        Um, Sm, Vmt = np.linalg.svd(M)
        M = M - np.outer(u, a) / (a @ (Vmt[:k].T @ ((Um[:, :k].T @ u) / Sm[:k])))
    Um, Sm, Vmt = np.linalg.svd(M)
    return U @ Um[:, :rank], Sm[:rank], V @ Vmt[:rank].T, float(Sm[rank]) if len(Sm) > rank else 0.0


def invert_fedsgd(update: dict[str, np.ndarray], params: dict[str, np.ndarray], batch_size: int,
                  dropout: float, *, rng: np.random.Generator | None = None, ransac_draws: int = 20_000,
                  stall: int = 0, give_up: int = 0) -> Recovered:
    """Recover the inputs and labels of the batch behind one FedSGD update.

    ``update``: the client's gradient (``dense1.weight``, ``dense1.bias``, ``dense2.weight``,
    ``out.bias`` at least); ``params``: the global model it was computed at; ``batch_size``: ``B``
    (the protocol's ``min(fl.batch_size, n_k)``); ``dropout``: the model's rate. Samples are
    recovered one by one, each certified, then subtracted from the gradient, so that the ones left
    dominate rows of the residual; RANSAC (``ransac_draws`` per pass) runs only when no row points
    to a missing sample, and a pass that has found a sample stops after ``stall`` draws without
    another (0: never); a pass over a residual that has found nothing stops after ``give_up`` draws
    (0: never). What is left is searched in the undeflated gradient (see the module's notes).

    ``stall`` and ``give_up`` trade draws for recovered utterances, and the screens in front of the
    certificate (:func:`_may_certify`, :func:`_normals_worth_certifying`) change nothing recovered
    (the same samples, bit for bit) while sparing most exact certificates; benchmarks/README.md holds
    what they recovered and cost on paper-size updates.
    """
    # every matrix here is small (256 x r, r <= B): BLAS threads only contend with each other and with
    # whatever runs beside (benchmarks/README.md: a 256 x 989 SVD on two busy cores with OpenBLAS's threads)
    with threadpool_limits(limits=1, user_api="blas"):
        return _invert(update, params, batch_size, dropout, rng or np.random.default_rng(0), ransac_draws, stall, give_up)


def _invert(update: dict[str, np.ndarray], params: dict[str, np.ndarray], batch_size: int, dropout: float,
            rng: np.random.Generator, ransac_draws: int, stall: int, give_up: int) -> Recovered:
    missing = [k for k in ("dense1.weight", "dense1.bias", "dense2.weight") if k not in update]
    if missing:
        raise KeyError(f"the inversion needs the recorded layers {missing} (recorder.layers must include dense1, dense2)")
    G1 = np.concatenate([update["dense1.weight"], update["dense1.bias"][:, None]], 1).astype(np.float64)
    G2 = update["dense2.weight"].astype(np.float64)
    layers = _Layers(params, dropout)
    empty = Recovered(np.zeros((0, G1.shape[1] - 1)), np.zeros(0, dtype=np.int64), np.zeros(0), int(batch_size))
    if not (np.isfinite(G1).all() and np.isfinite(G2).all()) or not np.abs(G1).max() > 0:
        return empty
    U, s, Vt = _thin_svd(G1)
    if len(s) > batch_size and s[batch_size] > LOW_RANK * s[0]:
        # not a sum of B per-sample terms (DP noise, Adam's elementwise steps): nothing exact to find
        empty.info = {"rank_gap": float(s[batch_size] / s[0])}
        return empty
    r = int(min(batch_size, (s > 1e-7 * s[0]).sum()))
    noise = float(s[r]) if len(s) > r else 0.0
    U, S, V = U[:, :r], s[:r], Vt[:r].T
    R2 = _thin_svd(G2)[2][:r].T
    samples: list[_Sample] = []
    draws, passes = 0, []
    whole = _Frame(U, S, V, noise, R2)
    while len(samples) < r:
        new, spent = _search(whole if not samples else _Frame(U, S, V, noise, R2), layers, samples, rng, ransac_draws,
                             stall, give_up)
        draws += spent
        passes.append(len(new))
        samples += new
        if not new or len(samples) == r:
            break
        U, S, V, left = _deflate(U, S, V, new, r - len(samples))
        noise = max(noise, left)
    if samples and len(samples) < r:
        rescued, spent = _rescue(whole, layers, samples, rng, ransac_draws, stall)
        draws += spent
        samples += rescued
        passes.append(len(rescued))
    labels, probs = [], []
    for smp in samples:
        p, z2 = layers.forward(smp.x, smp.kept)
        scores = [abs(e @ smp.error) / (np.linalg.norm(e) * np.linalg.norm(smp.error) + 1e-30)
                  for e in (layers.error(p, z2, smp.kept, c) for c in range(len(p)))]
        labels.append(int(np.argmax(scores)))
        probs.append(p)
    rec = Recovered(np.array([smp.x[:-1] for smp in samples]).reshape(len(samples), G1.shape[1] - 1),
                    np.array(labels, dtype=np.int64), np.array([smp.certificate for smp in samples]), r, draws=draws,
                    info={"found_per_pass": passes})
    if rec.complete and "out.bias" in update:
        rec.label_counts = np.sum(probs, axis=0) - r * update["out.bias"].astype(np.float64)
    return rec


@dataclass(frozen=True)
class InversionJob:
    """One update to invert: its arrays, the global model it was computed at, its batch size ``B``
    and the seed of its own RANSAC draws (e.g. ``(attack seed, round, client)``)."""

    update: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    batch_size: int
    seed: Sequence[int]


def _invert_job(job: InversionJob, dropout: float, ransac_draws: int, stall: int, give_up: int) -> Recovered:
    return invert_fedsgd(job.update, job.params, job.batch_size, dropout,
                         rng=np.random.default_rng(list(job.seed)), ransac_draws=ransac_draws, stall=stall, give_up=give_up)


def invert_all(jobs: Iterable[InversionJob], dropout: float, *, ransac_draws: int = 20_000, stall: int = 0,
               give_up: int = 0, workers: int = 1) -> Iterator[Recovered]:
    """:func:`invert_fedsgd` on every job, results in the jobs' order, on ``workers`` processes.

    Each update is inverted alone (one BLAS thread: its matrices are small), so a 2-core machine
    inverts two at once. Every job draws from its own seed, so what is recovered from an update does
    not depend on the other jobs, their order or ``workers``. At most ``2 * workers`` jobs are held
    at once (a paper-size run has ~1,600 updates of ~1 MB each). Workers are forked where the OS can
    (they run numpy only, never the caller's torch or Ray threads, and need no ``__main__`` guard in
    the caller's script, as spawned ones would); elsewhere they are spawned.
    """
    if workers <= 1:
        for job in jobs:
            yield _invert_job(job, dropout, ransac_draws, stall, give_up)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_invert_job, job, dropout, ransac_draws, stall, give_up))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def inversion_workers(requested: int, jobs: int) -> int:
    """Processes for :func:`invert_all`: ``requested`` (0: every core this process may use), never more
    than one per 4 jobs (on fewer, a fork and the ~2 MB of arrays each job sends cost about what the
    second core saves: benchmarks/README.md)."""
    if requested < 0:
        raise ValueError(f"inversion workers: must be >= 0 (0: all cores), got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, jobs // 4))
