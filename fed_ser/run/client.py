"""What one client sends in one round under the run's settings: the shared local loop plus the defences.

:func:`client_update` is the single entry point of the Flower ClientApp and the in-process engine.
It reads the run settings, builds the defence they name (:mod:`defenses`) and hands it to
:func:`fed_ser.core.training.local_update`, the one local loop. The defence mechanisms are imported
when a run uses them: Opacus's import is slow, and every ClientApp process would pay it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from fed_ser.core.training import LocalResult, local_update, sample_rate
from fed_ser.run.settings import RunSettings


def client_update(model: nn.Module, X: np.ndarray, y: np.ndarray, s: RunSettings, seed: int, *,
                  client: int, num_clients: int, local: Callable[..., LocalResult] = local_update) -> LocalResult:
    """What one client sends in one round under run settings ``s``, defences included.

    The single entry point of the Flower ClientApp and the in-process engine: plain FedSGD /
    FedAvg, DP-FedSGD (``dp.mode=sample``), user-level DP (``dp.mode=user``), UDP as published
    (``dp.mode=udp``) and federated adversarial training (``adv.mix > 0``, examples crafted against
    the received global model). ``client`` (its id) and ``num_clients`` place the client in the shared schedule
    (the DP calibration): ``num_clients`` is :func:`fed_ser.core.schedule.federation_size`. ``local`` is the
    local loop, :func:`~fed_ser.core.training.local_update`; the privacy audit's canary clients
    (:mod:`fed_ser.flower.canary`) replace it with their fixed update, so that the defences run on them as on any client.
    """
    privacy = s.privacy()
    hook = None
    adv = s.adversarial_training()
    if adv is not None:
        from defenses.evasion.adversarial_training import AdversarialBatches

        hook = AdversarialBatches(model, adv, seed + 2)
    dp_sgd, metrics = None, {}
    if s.dp_mode == "sample":
        from defenses.privacy.dp_fedsgd import PrivateGradient, noise_multiplier
        from fed_ser.run.privacy import dp_steps

        q = sample_rate(s.batch_size, len(X))
        sigma = noise_multiplier(privacy, q, dp_steps(s, client, num_clients))
        dp_sgd = PrivateGradient(sigma, privacy.clip, min(s.batch_size, len(X)))
        metrics = {"dp-noise-multiplier": sigma, "dp-sample-rate": q}
    old = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()} if s.dp_mode in ("user", "udp") else None
    r = local(model, X, y, algorithm=s.algorithm, batch_size=s.batch_size, lr=s.lr, epochs=s.local_epochs,
                     optimizer=s.optimizer, seed=seed, dp_sgd=dp_sgd, batch_hook=hook)
    if s.dp_mode == "user":
        from defenses.privacy.user_dp import privatize, server_noise_multiplier
        from fed_ser.run.privacy import dp_steps

        sigma = server_noise_multiplier(privacy, dp_steps(s, client, num_clients))
        r.arrays = privatize(r.arrays, old, privacy.clip, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-noise-multiplier": sigma}
    elif s.dp_mode == "udp":
        from defenses.privacy.udp import privatize_update, udp_sigma

        sigma = udp_sigma(privacy, len(X), s.fraction, s.rounds)
        r.arrays = privatize_update(r.arrays, old, privacy, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-sigma": sigma}
    r.metrics = {**r.metrics, **metrics}
    return r
