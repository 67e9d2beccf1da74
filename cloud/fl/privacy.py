"""Differential privacy of a federated task: the round's parameters, the noisy mean, the budget.

User-level DP-FedAvg (McMahan et al. 2018): every selected device clips its whole
update to an L2 bound ``C``, and Gaussian noise of standard deviation ``z * C`` is
added to the sum of the round's updates: by the devices (``client``: each adds all
of it to its own update, a local guarantee against the server), by the server after
summing (``central``: a trusted server; it clips every update again, so a device
that did not clip cannot raise the sensitivity), or in shares (``distributed``: each
of the ``m`` selected devices adds ``z * C / sqrt(m)``, so the sum carries it all,
for use with secure aggregation). The mean is then the noisy sum over the number of
updates received (public: the round's participants are published), and it goes to
the task's strategy as its one update, so server optimizers (FedAdam, ...) step on
the private mean. Strategies that need every update (median, Krum, trimmed mean)
cannot be combined with it.

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with
adaptive clipping"): each device also reports the bit "my update was within C",
privatized with Gaussian noise of standard deviation ``sigma_b`` on the bits' sum,
and the bound moves geometrically towards the target quantile:
``C <- C * exp(-lr * (b_mean - target))``. The update's noise multiplier is raised
to ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the pair is one Gaussian
mechanism of multiplier ``z`` (their Theorem 1).

Accounting is Google's dp-accounting, not code of ours: each released round is a
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with ``q`` the real sampling
probability of the round (selected devices / eligible members), composed over the
rounds; in ``client`` mode the server sees each update, so a device's guarantee is
the composition of ``GaussianDpEvent(z)`` over the rounds it took part in (no
amplification by sampling), reported for the device that took part most. With a
``target_epsilon`` the multiplier is calibrated once, before the first round, with
dp-accounting's ``calibrate_dp_mechanism`` for the planned rounds at the first
round's sampling probability; a round that would take the task past the target is
not opened.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from pydantic import BaseModel, ConfigDict, Field

from cloud.fl.config import PrivacyConfig
from cloud.fl.errors import StrategyConfigError
from cloud.fl.strategy import FLOAT32, Strategy, Weights
from schemas.fl import PrivacySpec

logger = logging.getLogger(__name__)

Mode = Literal["client", "central", "distributed"]
RDP_ORDERS: tuple[float, ...] = (*map(float, range(2, 65)), 80.0, 96.0, 128.0, 256.0,
                                 512.0, 1024.0)
"""Rényi orders tried: integers, whose sampled-Gaussian terms dp-accounting computes in
closed form (its series for fractional orders may not converge at large q and is left out
with a warning)."""


# -- accounting (dp-accounting) -------------------------------------------------------


def make_accountant(kind: Literal["rdp", "pld"]) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant of the configured kind."""
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant()
    return rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))


def round_event(mode: Mode, q: float, z: float) -> dp_event.DpEvent:
    """One released round as dp-accounting sees it."""
    if z <= 0:
        return dp_event.NonPrivateDpEvent()
    gaussian = dp_event.GaussianDpEvent(z)
    if mode == "client" or q >= 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(q, gaussian)


def epsilon(events: Sequence[dp_event.DpEvent], delta: float,
            kind: Literal["rdp", "pld"]) -> float:
    """Epsilon at ``delta`` of the events composed (inf when one is not private)."""
    if any(isinstance(e, dp_event.NonPrivateDpEvent) for e in events):
        return math.inf
    accountant = make_accountant(kind)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def calibrate(config: PrivacyConfig, q: float, rounds: int) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend ``target_epsilon``."""
    target = config.target_epsilon
    assert target is not None  # noqa: S101 - the caller checks

    def event(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(round_event(config.mode, q, z), rounds)

    z = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(config.accountant), event, target, config.delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    return float(z)


# -- the task's privacy state ------------------------------------------------------------


class LedgerRound(BaseModel):
    """One released round, as the accountant composes it."""

    model_config = ConfigDict(extra="forbid")

    round: int
    q: float = Field(ge=0, le=1, description="Sampling probability: selected / eligible")
    z: float = Field(ge=0, description="Effective noise multiplier of the round's sum")
    received: int = Field(ge=0)
    clip_norm: float = Field(gt=0)


class PrivacyState(BaseModel):
    """What the coordinator keeps (persisted with its state)."""

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float = Field(ge=0, description="z, configured or calibrated")
    clip_norm: float = Field(gt=0, description="The bound of the next round")
    rounds: list[LedgerRound] = Field(default_factory=list)
    participations: dict[str, int] = Field(default_factory=dict)
    epsilon: float = 0.0


def initial_state(config: PrivacyConfig, q: float, rounds: int) -> PrivacyState:
    """Before the first round: the multiplier (calibrated when a target is given)."""
    z = config.noise_multiplier
    if z is None:
        z = calibrate(config, q, rounds)
        logger.info("noise multiplier %.4f calibrated for epsilon %g at delta %g over %d "
                    "rounds (q %.3f, %s mode)", z, config.target_epsilon, config.delta,
                    rounds, q, config.mode)
    clip = config.clip_norm if config.clip_norm is not None else \
        config.adaptive_clip.initial_clip  # type: ignore[union-attr]
    return PrivacyState(noise_multiplier=z, clip_norm=clip)


def count_stddev(config: PrivacyConfig, z: float, expected: int) -> float | None:
    """Noise on the sum of the clip bits (None without adaptive clipping)."""
    adaptive = config.adaptive_clip
    if adaptive is None:
        return None
    if adaptive.count_stddev is not None:
        return adaptive.count_stddev
    return max(expected / 20, z) if z > 0 else 0.0


def update_multiplier(z: float, sigma_b: float | None) -> float:
    """The updates' own multiplier so that updates and clip bits together are ``z``.

    Raises:
        ValueError: the bits' noise is too small for ``z`` (``2 sigma_b <= z``).
    """
    if sigma_b is None or z == 0:
        return z
    if 2 * sigma_b <= z:
        raise ValueError(f"adaptive clipping needs count_stddev > noise_multiplier / 2 "
                         f"({sigma_b:g} <= {z / 2:g})")
    return float((z ** -2 - (2 * sigma_b) ** -2) ** -0.5)


def round_spec(config: PrivacyConfig, state: PrivacyState, selected: int) -> PrivacySpec:
    """What the round plan tells the ``selected`` devices to do."""
    z = state.noise_multiplier
    sigma_b = count_stddev(config, z, selected)
    z_delta = update_multiplier(z, sigma_b)
    share = {"client": 1.0, "central": 0.0, "distributed": 1 / math.sqrt(max(1, selected))}
    device_bits = None if sigma_b is None else sigma_b * share[config.mode]
    return PrivacySpec(mode=config.mode, clip_norm=state.clip_norm, noise_multiplier=z_delta,
                       noise_stddev=z_delta * state.clip_norm * share[config.mode],
                       clip_count_stddev=device_bits)


def spent(config: PrivacyConfig, state: PrivacyState, planned: LedgerRound | None = None,
          planned_devices: Sequence[str] = ()) -> float:
    """Epsilon of the released rounds (and of a planned one) at the task's delta."""
    rounds = [*state.rounds, *([planned] if planned is not None else [])]
    if config.mode == "client":
        counts = dict(state.participations)
        for device in planned_devices:
            counts[device] = counts.get(device, 0) + 1
        most = max(counts.values(), default=0)
        if most == 0:
            return 0.0
        z = min(r.z for r in rounds)  # the weakest round, taken for every participation
        return epsilon([round_event("client", 1.0, z)] * most, config.delta, config.accountant)
    if not rounds:
        return 0.0
    return epsilon([round_event(config.mode, r.q, r.z) for r in rounds], config.delta,
                   config.accountant)


def release_round(config: PrivacyConfig, state: PrivacyState, *, round_: int, q: float,
                  selected: int, participants: Sequence[str],
                  clip_bits: Sequence[float], server_bits_noise: float) -> None:
    """Account a released round, and move the adaptive bound (in place)."""
    received = len(participants)
    z = state.noise_multiplier
    if config.mode == "distributed" and selected:  # only the received shares are in the sum
        z *= math.sqrt(received / selected)
    state.rounds.append(LedgerRound(round=round_, q=q, z=z, received=received,
                                    clip_norm=state.clip_norm))
    for device in participants:
        state.participations[device] = state.participations.get(device, 0) + 1
    state.epsilon = spent(config, state)
    adaptive = config.adaptive_clip
    if adaptive is not None and received:
        unclipped = (sum(clip_bits) + server_bits_noise) / received
        state.clip_norm = float(state.clip_norm * math.exp(
            -adaptive.learning_rate * (unclipped - adaptive.target_quantile)))


# -- the noisy mean --------------------------------------------------------------------


def clip(delta: Mapping[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``bound`` (float64), and its norm before."""
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm


class DPMean(Strategy):
    """The mean of clipped updates with Gaussian noise, then the task's strategy on it.

    Every update weighs the same (a device's example count would change the
    sensitivity). The coordinator sets the round's bound and the server's noise with
    :meth:`configure_round` before the first update.
    """

    name = "dp-mean"

    def __init__(self, inner: Strategy, mode: Mode, *, seed: int | None = None) -> None:
        if inner.buffers or not inner.dp_compatible:
            raise StrategyConfigError(
                inner.name, "differential privacy averages clipped updates with noise; "
                f"{inner.name} needs every update as sent: use fedavg, fedprox, fedadam, "
                "fedyogi, fedadagrad or fedbn")
        super().__init__()
        self.inner = inner
        self.mode = mode
        self.clip_norm = 1.0
        self.server_noise_stddev = 0.0
        self._rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self._sum: dict[str, np.ndarray] = {}

    def configure_round(self, clip_norm: float, server_noise_stddev: float) -> None:
        """The round's bound, and the noise the server adds to the sum (central mode)."""
        self.clip_norm = clip_norm
        self.server_noise_stddev = server_noise_stddev

    def shared_names(self, names: Iterable[str]) -> list[str]:
        """The inner strategy's shared names."""
        return self.inner.shared_names(names)

    def config(self) -> dict[str, float | int | str | list[str] | None]:
        """The inner strategy's parameters."""
        return self.inner.config()

    def client_config(self) -> dict[str, float]:
        """What the inner strategy asks of the devices (FedProx's mu)."""
        return self.inner.client_config()

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The inner strategy's state (server optimizer moments)."""
        return self.inner.state_arrays()

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the inner strategy's state."""
        self.inner.load_state_arrays(arrays)

    def _on_begin(self) -> None:
        self._sum = {name: np.zeros(self.global_weights[name].shape, dtype=np.float64)
                     for name in self.shared}

    def _on_end(self) -> None:
        self._sum = {}

    def _accumulate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        shared = {name: delta[name] for name in self.shared}
        if self.mode == "central":  # the trusted server bounds every contribution itself
            values, _ = clip(shared, self.clip_norm)
        else:  # noised on the device: clipping again would cut the noise, not the data
            values = {k: np.asarray(v, dtype=np.float64) for k, v in shared.items()}
        for name, value in values.items():
            self._sum[name] += value

    def noisy_mean(self) -> Weights:
        """(sum + N(0, server_noise_stddev^2)) / updates, float32."""
        out: Weights = {}
        for name, summed in self._sum.items():
            total = summed
            if self.server_noise_stddev > 0:
                total = summed + self._rng.normal(0.0, self.server_noise_stddev, summed.shape)
            out[name] = (total / self.count).astype(FLOAT32)
        return out

    def _aggregate(self) -> Weights:
        mean = self.noisy_mean()
        self.inner.begin_round(self.global_weights)
        self.inner.add(mean, 1.0)
        return self.inner.finalize()
