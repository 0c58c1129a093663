"""Flower's own differential privacy, used as shipped: the strategy wrapper and the client mods of a mode.

``flower_dp.mode`` (:data:`fed_ser.run.settings.FLOWER_DP_MODES`) picks one of Flower's mechanisms:

* ``central-fixed``: :class:`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`;
* ``central-adaptive``: :class:`flwr.serverapp.strategy.DifferentialPrivacyServerSideAdaptiveClipping`;
* ``client-fixed``: :class:`flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping` with
  :func:`flwr.clientapp.mod.fixedclipping_mod` on the clients;
* ``local``: :class:`flwr.clientapp.mod.LocalDpMod` on the clients (sensitivity ``2 clip``: any two
  data sets of a client give clipped updates at most that far apart).

The wrappers clip ``reply - global``, so under these modes FedSGD clients reply with the one-step
model ``theta - lr g`` (:attr:`~fed_ser.run.settings.RunSettings.model_replies`). The recorder wraps the
result (:class:`~fed_ser.flower.eavesdropper.Eavesdropper`): the curious server records what it receives,
before its own clipping and noise. What each mode's epsilon guarantees, and against whom, is in
:mod:`defenses.privacy.central`; :mod:`fed_ser.flower.audit` runs the same mechanisms on the
audit's canary client.
"""

from __future__ import annotations

from flwr.client.mod import LocalDpMod as LegacyLocalDpMod
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fed_ser.run.settings import RunSettings

#: The modes whose wrapper adds noise to the mean of clipped replies (the inner strategy must then weigh
#: the replies alike, see :class:`fed_ser.flower.strategy.FedSerStrategy`).
CENTRAL_DP_MODES = ("central-fixed", "central-adaptive", "client-fixed")


def wrap_strategy(strategy: Strategy, s: RunSettings, clients_per_round: int) -> Strategy:
    """``strategy`` inside the server-side wrapper of ``s.flower_dp_mode`` (as is for none / local)."""
    mode = s.flower_dp_mode
    if mode == "central-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, s.flower_dp_noise, s.flower_dp_clip, clients_per_round)
    if mode == "central-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(strategy, s.flower_dp_noise, clients_per_round,
                                                             initial_clipping_norm=s.flower_dp_clip,
                                                             clipped_count_stddev=clipped_count_stddev(s.flower_dp_noise, clients_per_round))
    if mode == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, s.flower_dp_noise, s.flower_dp_clip, clients_per_round)
    return strategy


def clipped_count_stddev(noise_multiplier: float, clients_per_round: int) -> float:
    """The noise on the clipped-count release of adaptive clipping: Flower's default ``m / 20``, or, where
    that is too small for ``noise_multiplier`` (a few clients a round: Flower then refuses to start), the
    value that leaves the update ``sqrt(2)`` times the noise multiplier (half the budget on each release)."""
    return max(clients_per_round / 20.0, noise_multiplier / 2**0.5)


def client_mods(s: RunSettings) -> list:
    """The ClientApp mods of ``s.flower_dp_mode``: Flower's Message-API mods, or under ``fl.secagg`` their
    legacy twins (inside ``secaggplus_mod`` the message is in the legacy format, which the Message-API
    mods refuse with an error reply)."""
    legacy = s.secagg
    if s.flower_dp_mode == "client-fixed":
        return [legacy_fixedclipping_mod if legacy else fixedclipping_mod]
    if s.flower_dp_mode == "local":
        return [(LegacyLocalDpMod if legacy else LocalDpMod)(s.flower_dp_clip, 2.0 * s.flower_dp_clip,
                                                             s.flower_dp_epsilon, s.flower_dp_delta)]
    return []
