"""Exact inversion of FedSGD updates (attacks/inference/inversion.py) on the model's real gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.inference.inversion import InversionJob, inversion_workers, invert_all, invert_fedsgd
from fed_ser.core.model import build_model
from fed_ser.core.training import local_update
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare


@pytest.fixture(scope="module")
def setting(corpora, feature_cache, tmp_path_factory):
    """A model trained a little on synthetic MSP-Improv clients, and those clients' rows."""
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}", "shards.msp_improv=1"])
    data = FederatedData.load(prepare(cfg, ["msp_improv"], fold=0))
    torch.set_num_threads(1)  # the same model whatever ran before (thread counts change float sums)
    torch.manual_seed(0)  # and the same dropout masks in its training: one model, every run
    model = build_model(data.X.shape[1], 0.2, seed=0)
    X, y = (torch.as_tensor(a) for a in (data.X[data.split == TRAIN], data.y[data.split == TRAIN]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):  # a model that has learnt something: sparse, uneven errors, like mid-training
        for i in range(0, len(X), 20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[i:i + 20]), y[i:i + 20]).backward()
            opt.step()
    return model, data


def _batch(setting, b: int, seed: int = 0):
    model, data = setting
    X, y = (np.concatenate(a) for a in zip(*(data.client_rows(c, TRAIN) for c in range(data.num_clients))))
    rows = np.random.default_rng(seed).choice(len(X), b, replace=False)
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    grad = local_update(model, X[rows], y[rows], algorithm="fedsgd", batch_size=b, seed=seed).arrays
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return grad, params, X[rows], y[rows]


def _matches(recovered: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """Largest relative error to the nearest true input, and how many distinct inputs are matched."""
    err = np.linalg.norm(recovered[:, None] - truth[None], axis=2) / np.linalg.norm(truth, axis=1)[None]
    return float(err.min(1).max()), len(set(err.argmin(1).tolist()))


def test_a_batch_of_one_is_recovered_to_1e5(setting):
    grad, params, X, y = _batch(setting, 1)
    rec = invert_fedsgd(grad, params, 1, dropout=0.2)
    assert rec.complete and np.abs(rec.inputs[0] - X[0]).max() <= 1e-5 * np.abs(X[0]).max()
    assert rec.labels.tolist() == y.tolist()


def test_every_input_and_label_of_a_batch_is_recovered_and_label_counts_are_exact(setting):
    grad, params, X, y = _batch(setting, 7, seed=7)
    rec = invert_fedsgd(grad, params, 7, dropout=0.2, rng=np.random.default_rng(0))
    err, distinct = _matches(rec.inputs, X)
    assert rec.complete and distinct == 7 and err < 1e-3, (err, distinct)
    order = np.linalg.norm(rec.inputs[:, None] - X[None], axis=2).argmin(1)
    assert rec.labels.tolist() == y[order].tolist()
    # the output layer's bias gradient with the recovered probabilities: the batch's label counts
    counts = rec.label_counts
    assert np.abs(counts - np.round(counts)).max() < 1e-3
    assert np.round(counts).astype(int).tolist() == np.bincount(y, minlength=4).tolist()


def test_a_larger_batch_is_recovered_sample_by_sample_and_only_exactly(setting):
    """Past the rows one sample dominates, RANSAC finds the rest with a budget: most, never a wrong one."""
    grad, params, X, y = _batch(setting, 14, seed=14)
    rec = invert_fedsgd(grad, params, 14, dropout=0.2, rng=np.random.default_rng(0))
    err, distinct = _matches(rec.inputs, X)
    assert len(rec.inputs) >= 12 and distinct == len(rec.inputs) and err < 1e-3, (len(rec.inputs), err, distinct)
    order = np.linalg.norm(rec.inputs[:, None] - X[None], axis=2).argmin(1)
    assert rec.labels.tolist() == y[order].tolist()


def test_noise_or_a_full_rank_update_is_not_inverted(setting):
    grad, params, _X, _ = _batch(setting, 7, seed=3)
    noisy = {k: v + np.random.default_rng(0).normal(0, 1e-3 * np.abs(v).max(), v.shape).astype(np.float32)
             for k, v in grad.items()}  # what DP noise does to the low-rank structure
    rec = invert_fedsgd(noisy, params, 7, dropout=0.2)
    assert len(rec.inputs) == 0 and rec.info["rank_gap"] > 1e-5
    # a wrong claim about the batch size is not believed either: nothing spurious is certified
    rec = invert_fedsgd(grad, params, 3, dropout=0.2)
    assert len(rec.inputs) == 0


def test_a_mixture_of_two_samples_normals_fails_the_certificate(setting):
    from attacks.inference.inversion import _certify, _Frame, _Layers

    grad, params, X, _ = _batch(setting, 7, seed=5)
    G1 = np.concatenate([grad["dense1.weight"], grad["dense1.bias"][:, None]], 1).astype(np.float64)
    U, S, Vt = np.linalg.svd(G1, full_matrices=False)
    R2 = np.linalg.svd(grad["dense2.weight"].astype(np.float64), full_matrices=False)[2][:7].T
    frame, layers = _Frame(U[:, :7], S[:7], Vt[:7].T, S[7], R2), _Layers(params, 0.2)
    A = np.concatenate([X, np.ones((7, 1))], 1) @ frame.V  # the true samples in row-space coordinates
    normals = [np.linalg.svd(np.delete(A, i, 0))[2][-1] for i in range(7)]
    certs = [_certify(frame, layers, q)[0] for q in normals]
    mixed = _certify(frame, layers, (normals[0] + normals[1]) / np.linalg.norm(normals[0] + normals[1]))[0]
    assert max(certs) < 1e-3 < 0.05 < mixed


def _frame_of_20(setting):
    """The whole frame of a 20-sample batch's update, its layers, and the true samples' normals."""
    from attacks.inference.inversion import _Frame, _Layers, _thin_svd

    grad, params, X, _ = _batch(setting, 20, seed=20)
    G1 = np.concatenate([grad["dense1.weight"], grad["dense1.bias"][:, None]], 1).astype(np.float64)
    U, S, Vt = _thin_svd(G1)
    R2 = _thin_svd(grad["dense2.weight"].astype(np.float64))[2][:20].T
    frame, layers = _Frame(U[:, :20], S[:20], Vt[:20].T, float(S[20]), R2), _Layers(params, 0.2)
    A = np.concatenate([X, np.ones((20, 1))], 1) @ frame.V
    normals = np.array([np.linalg.svd(np.delete(A, i, 0))[2][-1] for i in range(20)])
    return frame, layers, normals


def test_the_certificate_screen_rules_out_only_masks_the_exact_certificate_rejects(setting):
    """The Gram-matrix screen in front of the exact certificate: every mask it rules out certifies
    above the threshold (by its 10x margin), the true samples' masks pass, and it rules out most
    masks that are no sample's (else it would save nothing)."""
    from attacks.inference.inversion import CERTIFICATE, _certify_exact, _may_certify

    frame, layers, normals = _frame_of_20(setting)
    frame.pre_activation(layers)
    rng = np.random.default_rng(0)
    mixed = normals[rng.integers(0, 20, 300)] + normals[rng.integers(0, 20, 300)] * rng.uniform(0.1, 1, (300, 1))
    masks = [frame.live & (np.abs(Q @ frame.W.T) >= frame.tol) for Q in (normals, mixed)]
    masks.append(frame.live & (rng.random((300, len(frame.W))) < 0.5))  # random sets of units
    kept = np.concatenate(masks)
    hope = _may_certify(frame, kept)
    exact = np.array([c for c, _, _ in _certify_exact(frame, kept)])
    assert hope[:20].all() and (exact[:20] < CERTIFICATE).all()
    assert (exact[~hope] > 9 * CERTIFICATE).all(), exact[~hope].min()
    assert (~hope[20:]).mean() > 0.9, (~hope[20:]).mean()


def test_only_planes_that_may_certify_get_their_exact_normals(setting):
    """The candidate planes' normals: the true samples' planes get the exact normal (as
    :func:`_normals_of` computes it), and a plane left without one certifies above the threshold."""
    from attacks.inference.inversion import CERTIFICATE, _certify_exact, _normals_of, _normals_worth_certifying

    frame, layers, normals = _frame_of_20(setting)
    on = (np.abs(normals @ frame.W.T) < frame.tol) & frame.live  # the rows on each sample's plane
    rng = np.random.default_rng(0)
    rows = np.concatenate([on, frame.live & (rng.random((200, len(frame.W))) < 0.5)])
    worth, exact = _normals_worth_certifying(frame, layers, frame.W, rows), _normals_of(frame.W, rows)
    assert all(q is not None and min(np.abs(q - e).max(), np.abs(q + e).max()) < 1e-12 for q, e in zip(worth[:20], exact))
    left = [k for k, q in enumerate(worth) if q is None]
    assert len(left) > 180, len(left)  # the random planes: screened out
    Q = np.array([exact[k] for k in left])
    assert all(c > 9 * CERTIFICATE for c, _, _ in _certify_exact(frame, frame.live & (np.abs(Q @ frame.W.T) >= frame.tol)))


def test_a_fruitless_pass_over_a_residual_gives_up_and_a_first_pass_does_not(setting):
    """``give_up``: a pass with samples already known that finds nothing stops after that many draws
    (the undeflated search takes over); a first pass, with nothing known, draws its budget."""
    from attacks.inference.inversion import _Frame, _Layers, _Sample, _search, _thin_svd

    _, params, _, _ = _batch(setting, 8)
    rng = np.random.default_rng(1)
    G1 = rng.standard_normal((256, 6)) @ rng.standard_normal((6, params["dense1.weight"].shape[1] + 1))  # no sample's planes
    U, S, Vt = _thin_svd(G1)
    R2 = np.linalg.qr(rng.standard_normal((256, 6)))[0]
    layers = _Layers(params, 0.2)
    known = [_Sample(1e-8, np.ones(G1.shape[1]), np.ones(256, dtype=bool), np.ones(256))]

    def search(known, give_up):
        return _search(_Frame(U[:, :6], S[:6], Vt[:6].T, 1e-12, R2), layers, known, np.random.default_rng(0), 6000,
                       stall=500, give_up=give_up)

    assert search(known, 1000) == ([], 1000)
    assert search(known, 0) == ([], 6000)
    assert search([], 1000) == ([], 6000)



def test_stacked_normals_are_the_null_vectors_of_each_masked_set_of_rows():
    from attacks.inference.inversion import _normals_of

    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 6))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    masks = rng.random((5, 64)) < 0.5
    masks[3] = False
    masks[3, :5] = True  # exactly r - 1 rows: the plane through them is still defined
    masks[4] = False
    masks[4, :4] = True  # fewer than r - 1 rows: no plane
    qs = _normals_of(W, masks)
    assert qs[4] is None
    for m, q in zip(masks[:4], qs[:4]):
        expected = np.linalg.svd(W[m])[2][-1]  # the right singular vector of the smallest singular value
        assert abs(abs(q @ expected) - 1) < 1e-10 if m.sum() >= 6 else np.abs(W[m] @ q).max() < 1e-10
        assert abs(np.linalg.norm(q) - 1) < 1e-12


def test_updates_inverted_on_two_processes_are_recovered_as_one_by_one_and_alone(setting):
    """Each update draws from its own seed: the workers, the order and the other jobs change nothing."""
    jobs = []
    for k, b in enumerate((14, 7, 14, 3, 14, 7, 14, 3)):  # b = 14 needs RANSAC draws: the seeds matter
        grad, params, _X, _ = _batch(setting, b, seed=20 + k)
        jobs.append(InversionJob(grad, params, b, (0, k, 1)))
    serial = list(invert_all(jobs, 0.2, ransac_draws=4000))
    parallel = list(invert_all(iter(jobs), 0.2, ransac_draws=4000, workers=2))
    alone = next(invert_all([jobs[4]], 0.2, ransac_draws=4000))
    assert sum(len(r.inputs) for r in serial) >= 0.9 * sum(j.batch_size for j in jobs)
    assert [r.draws for r in serial] == [r.draws for r in parallel] and any(r.draws for r in serial)
    for a, b in zip(serial, parallel):
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(alone.inputs, serial[4].inputs) and alone.draws == serial[4].draws
    assert inversion_workers(0, 3) == 1 and inversion_workers(2, 100) == 2
    with pytest.raises(ValueError, match="workers"):
        inversion_workers(-1, 10)


def test_what_the_passes_leave_is_found_in_the_undeflated_gradient_and_a_last_sample_without_draws(setting):
    """The rescue search: projected away from the found samples, the gradient's rows are the missing
    samples' terms alone; with one sample missing its normal is known and no draw is spent."""
    from attacks.inference.inversion import _Frame, _Layers, _rescue, _Sample, _thin_svd

    grad, params, X, _ = _batch(setting, 7, seed=7)
    G1 = np.concatenate([grad["dense1.weight"], grad["dense1.bias"][:, None]], 1).astype(np.float64)
    U, S, Vt = _thin_svd(G1)
    R2 = _thin_svd(grad["dense2.weight"].astype(np.float64))[2][:7].T
    whole, layers = _Frame(U[:, :7], S[:7], Vt[:7].T, float(S[7]), R2), _Layers(params, 0.2)
    truth = [np.append(x, 1.0) for x in X.astype(np.float64)]
    known = [_Sample(0.0, x, np.ones(256, dtype=bool), np.zeros(256)) for x in truth]
    for left in (1, 3):
        found, draws = _rescue(whole, layers, known[:7 - left], np.random.default_rng(0), 4000, 1000)
        err, distinct = _matches(np.array([s.x[:-1] for s in found]).reshape(len(found), -1), X[7 - left:])
        assert len(found) == left and distinct == left and err < 1e-3, (left, len(found), err)
        assert (draws == 0) == (left == 1)


def test_a_stalled_pass_stops_drawing_and_the_batch_is_still_recovered(setting):
    """``stall``: a pass that has found samples stops drawing once the draws stop finding any (and
    deflates), where without it a pass draws its whole budget unless it finds every sample."""
    from attacks.inference.inversion import _Frame, _Layers, _search, _thin_svd

    grad, params, X, _ = _batch(setting, 20, seed=20)  # a first pass that finds 11 of 20
    G1 = np.concatenate([grad["dense1.weight"], grad["dense1.bias"][:, None]], 1).astype(np.float64)
    U, S, Vt = _thin_svd(G1)
    R2 = _thin_svd(grad["dense2.weight"].astype(np.float64))[2][:20].T
    layers = _Layers(params, 0.2)
    full, spent = _search(_Frame(U[:, :20], S[:20], Vt[:20].T, float(S[20]), R2), layers, [], np.random.default_rng(0), 20_000)
    assert len(full) == 20 or spent == 20_000
    some, spent = _search(_Frame(U[:, :20], S[:20], Vt[:20].T, float(S[20]), R2), layers, [], np.random.default_rng(0),
                          20_000, stall=500)
    assert some and spent < 20_000
    rec = invert_fedsgd(grad, params, 20, dropout=0.2, rng=np.random.default_rng(0), stall=500)
    err, distinct = _matches(rec.inputs, X)
    assert len(rec.inputs) >= 18 and distinct == len(rec.inputs) and err < 1e-3, (len(rec.inputs), err)
    assert rec.draws < invert_fedsgd(grad, params, 20, dropout=0.2, rng=np.random.default_rng(0)).draws
