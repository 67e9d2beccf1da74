"""Differential privacy: clipping and noise on the devices and the server, adaptive clipping,
the accountant (dp-accounting's own numbers), the budget, and a task over the real broker."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from cloud.fl.config import AdaptiveClipConfig, PrivacyConfig
from cloud.fl.errors import StrategyConfigError
from cloud.fl.privacy import (
    RDP_ORDERS,
    DPMean,
    LedgerRound,
    PrivacyState,
    calibrate,
    release_round,
    round_spec,
    spent,
    update_multiplier,
)
from cloud.fl.registry import make_strategy
from edge_node.fl_client import privatize
from schemas.codec import decode
from schemas.compression import decompress
from schemas.fl import PrivacySpec, TaskState, UpdateEnvelope
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.test_fl_rounds import device_fl, fl_config

TASK = "digits"


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))


def _library_epsilon(events: list[dp_event.DpEvent], delta: float, kind: str) -> float:
    accountant: Any = (pld_privacy_accountant.PLDAccountant() if kind == "pld"
                       else rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS)))
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


# -- accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_the_reported_epsilon_is_dp_accounting_s_own(kind: str) -> None:
    config = PrivacyConfig(mode="central", clip_norm=1.0, noise_multiplier=1.1, delta=1e-5,
                           accountant=kind)
    state = PrivacyState(noise_multiplier=1.1, clip_norm=1.0)
    for round_, q in enumerate((0.3, 0.5, 0.5, 1.0), start=1):
        release_round(config, state, round_=round_, q=q, selected=5,
                      participants=["a", "b"], clip_bits=[], server_bits_noise=0.0)
    expected = _library_epsilon(
        [dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.1)) for q in (0.3, 0.5, 0.5)]
        + [dp_event.GaussianDpEvent(1.1)], 1e-5, kind)
    assert state.epsilon == pytest.approx(expected, rel=1e-9)
    assert 0 < state.epsilon < math.inf


def test_distributed_noise_counts_only_the_shares_received() -> None:
    config = PrivacyConfig(mode="distributed", clip_norm=1.0, noise_multiplier=2.0)
    state = PrivacyState(noise_multiplier=2.0, clip_norm=1.0)
    release_round(config, state, round_=1, q=0.5, selected=4, participants=["a"],
                  clip_bits=[], server_bits_noise=0.0)  # 1 of 4 shares: half the std
    assert state.rounds[0].z == pytest.approx(1.0)
    assert state.epsilon == pytest.approx(_library_epsilon(
        [dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0))], 1e-5, "rdp"))


def test_client_mode_accounts_the_device_that_took_part_most_without_sampling() -> None:
    config = PrivacyConfig(mode="client", clip_norm=1.0, noise_multiplier=3.0)
    state = PrivacyState(noise_multiplier=3.0, clip_norm=1.0)
    for round_, who in enumerate((["a", "b"], ["a", "c"], ["a"]), start=1):
        release_round(config, state, round_=round_, q=0.5, selected=2, participants=who,
                      clip_bits=[], server_bits_noise=0.0)
    assert state.participations == {"a": 3, "b": 1, "c": 1}
    assert state.epsilon == pytest.approx(_library_epsilon(
        [dp_event.GaussianDpEvent(3.0)] * 3, 1e-5, "rdp"))


def test_the_multiplier_is_calibrated_to_the_target_and_the_budget_holds() -> None:
    config = PrivacyConfig(mode="central", clip_norm=1.0, target_epsilon=3.0, delta=1e-5)
    z = calibrate(config, q=0.5, rounds=10)
    reached = _library_epsilon(
        [dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(z))] * 10, 1e-5, "rdp")
    assert 2.99 <= reached <= 3.0, (z, reached)
    # An explicit multiplier with a target: the target is a budget, rounds stop at it.
    capped = PrivacyConfig(mode="central", clip_norm=1.0, noise_multiplier=2.0,
                           target_epsilon=6.0)
    state = PrivacyState(noise_multiplier=2.0, clip_norm=1.0)
    rounds = 0
    while spent(capped, state, LedgerRound(round=rounds + 1, q=1.0, z=2.0, received=1,
                                           clip_norm=1.0)) <= 6.0:
        rounds += 1
        release_round(capped, state, round_=rounds, q=1.0, selected=2, participants=["a"],
                      clip_bits=[], server_bits_noise=0.0)
    assert 2 <= rounds < 20 and state.epsilon <= 6.0
    assert state.epsilon == pytest.approx(_library_epsilon(
        [dp_event.GaussianDpEvent(2.0)] * rounds, 1e-5, "rdp"))


# -- the device's clipping and noise -------------------------------------------------------


def test_a_device_clips_its_whole_update_to_the_bound() -> None:
    rng = np.random.default_rng(7)
    delta = {"w": rng.normal(0, 1, (30, 20)).astype(np.float32),
             "b": rng.normal(0, 1, 20).astype(np.float32)}
    spec = PrivacySpec(clip_norm=0.5, noise_multiplier=0.0)
    clipped, bit = privatize(delta, spec)
    assert _norm(clipped) == pytest.approx(0.5, rel=1e-5) and bit is None
    # Already within the bound: unchanged. With adaptive clipping, bit 1.
    small = {k: v * (0.1 / _norm(delta)) for k, v in delta.items()}
    same, bit = privatize(small, spec.model_copy(update={"clip_count_stddev": 0.0}))
    assert bit == 1.0
    for name, value in small.items():
        np.testing.assert_allclose(same[name], value, rtol=1e-6)


def test_the_device_s_noise_has_the_configured_standard_deviation() -> None:
    delta = {"w": np.zeros((400, 500), np.float32)}
    spec = PrivacySpec(mode="client", clip_norm=1.0, noise_multiplier=0.8, noise_stddev=0.8)
    noised, _ = privatize(delta, spec, np.random.default_rng(20261201))
    sample = noised["w"].astype(np.float64).ravel()
    # 200,000 draws: the sample std is within 1 % of 0.8, and the draws are Gaussian.
    assert np.std(sample) == pytest.approx(0.8, rel=0.01)
    assert abs(float(np.mean(sample))) < 0.01
    assert stats.kstest(sample / 0.8, "norm").pvalue > 1e-3


def test_the_round_plan_splits_the_noise_by_mode() -> None:
    state = PrivacyState(noise_multiplier=1.0, clip_norm=0.5)
    for mode, expected in (("client", 0.5), ("central", 0.0), ("distributed", 0.25)):
        config = PrivacyConfig(mode=mode, clip_norm=0.5, noise_multiplier=1.0)
        spec = round_spec(config, state, selected=4)
        assert spec.noise_stddev == pytest.approx(expected) and spec.clip_count_stddev is None
    adaptive = PrivacyConfig(mode="distributed", adaptive_clip=AdaptiveClipConfig(
        count_stddev=2.0), noise_multiplier=1.0)
    spec = round_spec(adaptive, state, selected=4)
    z_delta = (1.0 ** -2 - 4.0 ** -2) ** -0.5
    assert spec.noise_multiplier == pytest.approx(z_delta)
    assert spec.noise_stddev == pytest.approx(z_delta * 0.5 / 2)
    assert spec.clip_count_stddev == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count_stddev"):
        update_multiplier(1.0, 0.5)


# -- the server ------------------------------------------------------------------------------


def test_the_central_server_clips_again_and_adds_the_noise_of_the_sum() -> None:
    global_weights = {"w": np.zeros(200_000, np.float32)}
    dp = DPMean(make_strategy("fedavg"), "central", seed=11)
    dp.begin_round(global_weights)
    dp.configure_round(clip_norm=1.0, server_noise_stddev=0.0)
    big = {"w": np.full(200_000, 1.0, np.float32)}  # norm 447: a device that did not clip
    for _ in range(4):
        dp.add(big, 1000.0)  # example counts do not weigh: every device counts once
    mean = dp.finalize()["w"].astype(np.float64)
    assert _norm({"w": mean}) == pytest.approx(1.0, rel=1e-5)
    dp.begin_round(global_weights)
    dp.configure_round(clip_norm=1.0, server_noise_stddev=0.6)
    for _ in range(4):
        dp.add({"w": np.zeros(200_000, np.float32)}, 1.0)
    noisy = dp.finalize()["w"].astype(np.float64)
    assert np.std(noisy) == pytest.approx(0.6 / 4, rel=0.01)  # N(0, (zC)^2) on the sum / n


def test_robust_strategies_refuse_differential_privacy() -> None:
    with pytest.raises(StrategyConfigError, match="needs every update"):
        DPMean(make_strategy("krum", {"num_byzantine": 1}), "central")


@pytest.mark.parametrize(("values", "why"), [
    ({"mode": "central", "noise_multiplier": 1.0}, "clip_norm or adaptive_clip"),
    ({"mode": "central", "clip_norm": 1.0, "adaptive_clip": {}, "noise_multiplier": 1.0},
     "clip_norm or adaptive_clip"),
    ({"mode": "central", "clip_norm": 1.0}, "noise_multiplier, target_epsilon"),
    ({"mode": "client", "adaptive_clip": {}, "noise_multiplier": 1.0}, "client mode"),
    ({"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
])
def test_a_privacy_section_that_makes_no_sense_is_refused(values: dict[str, Any],
                                                          why: str) -> None:
    with pytest.raises(ValueError, match=why):
        PrivacyConfig.model_validate(values)


def test_adaptive_clipping_follows_the_target_quantile_of_the_norms() -> None:
    rng = np.random.default_rng(5)
    config = PrivacyConfig(mode="central", adaptive_clip=AdaptiveClipConfig(
        target_quantile=0.5, learning_rate=0.2, initial_clip=0.01, count_stddev=0.5),
        noise_multiplier=0.5)
    state = PrivacyState(noise_multiplier=0.5, clip_norm=0.01)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=(150, 20))  # median 1.0
    for round_, batch in enumerate(norms, start=1):
        bits = [float(n <= state.clip_norm) for n in batch]
        release_round(config, state, round_=round_, q=1.0, selected=20,
                      participants=[f"d{i}" for i in range(20)], clip_bits=bits,
                      server_bits_noise=float(rng.normal(0, 0.5)))
    assert 0.8 <= state.clip_norm <= 1.25, state.clip_norm
    assert state.rounds[0].clip_norm == 0.01


# -- over the broker ------------------------------------------------------------------------


def test_a_private_task_over_the_broker_clips_accounts_and_stops_at_its_budget(
    make_cloud: CloudFactory, make_agent: AgentFactory, new_device_id: Callable[[], str],
) -> None:
    budget = 2.0
    privacy = {"mode": "central", "clip_norm": 0.05, "noise_multiplier": 5.0,
               "target_epsilon": budget, "delta": 1e-5}
    cloud = make_cloud(fl={TASK: fl_config(rounds=10, privacy=privacy)})
    agents = [make_agent(fl=device_fl(i, 3)) for i in range(3)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=180,
               what="the task stopped at its budget")
    history = coordinator.history()
    # The rounds that fit in the budget, as dp-accounting counts them (q = 1 here).
    fits = 0
    while _library_epsilon([dp_event.GaussianDpEvent(5.0)] * (fits + 1), 1e-5, "rdp") <= budget:
        fits += 1
    assert 1 <= fits < 10 and len(history) == fits
    assert (coordinator.state.message or "").startswith("privacy_budget"), \
        coordinator.state.message
    final = coordinator.status()
    assert final.epsilon_spent == pytest.approx(_library_epsilon(
        [dp_event.GaussianDpEvent(5.0)] * fits, 1e-5, "rdp"))
    assert [h.epsilon_spent for h in history] == pytest.approx([_library_epsilon(
        [dp_event.GaussianDpEvent(5.0)] * r, 1e-5, "rdp") for r in range(1, fits + 1)])
    # Every update that crossed the broker was clipped on its device to the bound.
    folder = cloud.settings.data_dir / "fl" / TASK
    norms = []
    for path in sorted(folder.glob("round-*/*.safetensors")):
        decoded = decode(path.read_bytes(), UpdateEnvelope)
        assert decoded.envelope.clip_norm == 0.05
        norms.append(_norm(decompress(decoded.tensors, decoded.envelope.compression)))
    assert len(norms) == 3 * fits and max(norms) <= 0.05 * (1 + 1e-5), norms
    assert all(a.fl is not None for a in agents)
