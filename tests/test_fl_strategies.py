"""Aggregation strategies: hand-computed cases, float64 references, robustness, memory."""

from __future__ import annotations

import logging
import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from cloud.fl import (
    STRATEGIES,
    IncompatibleUpdateError,
    NoUpdatesError,
    RejectReason,
    RoundStateError,
    Strategy,
    StrategyConfigError,
    UnknownStrategyError,
    make_strategy,
    validate_update,
)
from cloud.fl.fedavg import FedAvg, WeightedSum
from cloud.fl.fedbn import FedBN, is_batch_norm
from cloud.fl.fedprox import FedProx
from cloud.fl.robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean
from cloud.fl.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from schemas.fl import HyperParams, with_control

Arrays = dict[str, np.ndarray]


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def run_round(strategy: Strategy, global_weights: Arrays,
              updates: list[tuple[Arrays, float]]) -> Arrays:
    strategy.begin_round(global_weights)
    for delta, weight in updates:
        strategy.add(delta, weight)
    assert strategy.count == len(updates)
    return strategy.finalize()


def assert_weights(actual: Arrays, expected: dict[str, list[float]], rtol: float = 1e-6,
                   ) -> None:
    assert set(actual) == set(expected)
    for name, values in expected.items():
        assert actual[name].dtype == np.float32, name
        np.testing.assert_allclose(actual[name], values, rtol=rtol, atol=1e-7, err_msg=name)


# ------------------------------------------------------------ hand-computed

# Two clients, three parameters:
#   global w = [1, 2], b = [0.5]
#   client 1 (weight 1): dw = [1, 0],  db = [1]
#   client 2 (weight 3): dw = [-1, 2], db = [0]
#   mean dw = ([1, 0] + 3 [-1, 2]) / 4 = [-0.5, 1.5];  mean db = 1 / 4 = 0.25
GLOBAL = {"w": f32(1.0, 2.0), "b": f32(0.5)}
UPDATES = [({"w": f32(1.0, 0.0), "b": f32(1.0)}, 1.0),
           ({"w": f32(-1.0, 2.0), "b": f32(0.0)}, 3.0)]
FEDAVG_RESULT = {"w": [0.5, 3.5], "b": [0.75]}


def test_fedavg_hand_computed() -> None:
    assert_weights(run_round(FedAvg(), GLOBAL, UPDATES), FEDAVG_RESULT)


def test_fedprox_averages_like_fedavg_and_exports_mu() -> None:
    strategy = make_strategy("fedprox", {"proximal_mu": 0.01})
    assert isinstance(strategy, FedProx)
    assert_weights(run_round(strategy, GLOBAL, UPDATES), FEDAVG_RESULT)
    assert strategy.client_config() == {"proximal_mu": 0.01}
    assert strategy.config() == {"proximal_mu": 0.01}
    plan_hyperparams = HyperParams().model_copy(update=strategy.client_config())
    assert plan_hyperparams.proximal_mu == 0.01
    assert FedAvg().client_config() == {}


def test_fedavgm_zero_momentum_unit_lr_is_fedavg() -> None:
    strategy = FedAvgM(server_lr=1.0, momentum=0.0)
    assert_weights(run_round(strategy, GLOBAL, UPDATES), FEDAVG_RESULT)


# Server optimizers over two rounds, one parameter vector x0 = [1, -1].
#   round 1: clients [0.4, -0.4] (weight 3) and [-0.4, -0.4] (weight 1)
#            -> d1 = ([1.2, -1.2] + [-0.4, -0.4]) / 4 = [0.2, -0.4]
#   round 2: clients [0.3, 0.4] and [0.1, 0.4] (weight 1 each) -> d2 = [0.2, 0.4]
X0 = {"x": f32(1.0, -1.0)}
ROUND_1 = [({"x": f32(0.4, -0.4)}, 3.0), ({"x": f32(-0.4, -0.4)}, 1.0)]
ROUND_2 = [({"x": f32(0.3, 0.4)}, 1.0), ({"x": f32(0.1, 0.4)}, 1.0)]


def two_rounds(strategy: Strategy) -> tuple[Arrays, Arrays]:
    x1 = run_round(strategy, X0, ROUND_1)
    x2 = run_round(strategy, x1, ROUND_2)
    return x1, x2


def test_fedavgm_two_rounds() -> None:
    # eta 2, beta 0.5.  v1 = d1 = [0.2, -0.4];            x1 = x0 + 2 v1 = [1.4, -1.8]
    #                   v2 = 0.5 v1 + d2 = [0.3, 0.2];    x2 = x1 + 2 v2 = [2.0, -1.4]
    x1, x2 = two_rounds(FedAvgM(server_lr=2.0, momentum=0.5))
    assert_weights(x1, {"x": [1.4, -1.8]})
    assert_weights(x2, {"x": [2.0, -1.4]})


# Adaptive: eta 0.1, b1 0.5, b2 0.5, tau 1e-9 (negligible: v0 = 1e-18).
#   m1 = 0.5 d1 = [0.1, -0.2];  m2 = 0.5 m1 + 0.5 d2 = [0.15, 0.1]
#   d1^2 = [0.04, 0.16];        d2^2 = [0.04, 0.16]
ADAPTIVE = {"eta": 0.1, "beta_1": 0.5, "beta_2": 0.5, "tau": 1e-9}


def test_fedadam_two_rounds() -> None:
    # v1 = 0.5 d1^2 = [0.02, 0.08];  step1 = 0.1 m1 / sqrt(v1) = [0.0707107, -0.0707107]
    # v2 = 0.5 v1 + 0.5 d2^2 = [0.03, 0.12]
    # step2 = 0.1 [0.15 / 0.1732051, 0.1 / 0.3464102] = [0.0866025, 0.0288675]
    x1, x2 = two_rounds(FedAdam(**ADAPTIVE))
    assert_weights(x1, {"x": [1.0707107, -1.0707107]})
    assert_weights(x2, {"x": [1.1573132, -1.0418432]})


def test_fedyogi_two_rounds() -> None:
    # v1 = v0 - 0.5 d1^2 sign(v0 - d1^2) = 0.5 d1^2 = [0.02, 0.08]  (step1 as Adam)
    # sign(v1 - d2^2) = sign([-0.02, -0.08]) = [-1, -1]
    # v2 = v1 + 0.5 d2^2 = [0.04, 0.16];  step2 = 0.1 [0.15 / 0.2, 0.1 / 0.4] = [0.075, 0.025]
    x1, x2 = two_rounds(FedYogi(**ADAPTIVE))
    assert_weights(x1, {"x": [1.0707107, -1.0707107]})
    assert_weights(x2, {"x": [1.1457107, -1.0457107]})


def test_fedyogi_shrinks_v_when_gradients_get_smaller() -> None:
    strategy = FedYogi(**ADAPTIVE)
    run_round(strategy, X0, ROUND_1)  # v1 = [0.02, 0.08]
    # d2 = [0.1, 0.0]: sign(v1 - d2^2) = [+1, +1];  v2 = v1 - 0.5 d2^2 = [0.015, 0.08]
    # m2 = 0.5 m1 + 0.5 d2 = [0.1, -0.1];  step2 = 0.1 [0.1 / 0.1224745, -0.1 / 0.2828427]
    x1 = {"x": f32(1.0707107, -1.0707107)}
    x2 = run_round(strategy, x1, [({"x": f32(0.1, 0.0)}, 1.0)])
    assert_weights(x2, {"x": [1.0707107 + 0.0816497, -1.0707107 - 0.0353553]})


def test_fedadagrad_two_rounds() -> None:
    # v1 = d1^2 = [0.04, 0.16];  step1 = 0.1 [0.1 / 0.2, -0.2 / 0.4] = [0.05, -0.05]
    # v2 = v1 + d2^2 = [0.08, 0.32]
    # step2 = 0.1 [0.15 / 0.2828427, 0.1 / 0.5656854] = [0.0530330, 0.0176777]
    x1, x2 = two_rounds(FedAdagrad(**ADAPTIVE))
    assert_weights(x1, {"x": [1.05, -1.05]})
    assert_weights(x2, {"x": [1.1030330, -1.0323223]})


def test_server_optimizer_state_must_fit_the_model() -> None:
    strategy = FedAdam()
    run_round(strategy, X0, ROUND_1)
    assert strategy.steps == 1
    with pytest.raises(RoundStateError):
        strategy.begin_round({"x": f32(1.0, 2.0, 3.0)})
    strategy.reset_state()
    run_round(strategy, {"x": f32(1.0, 2.0, 3.0)}, [({"x": f32(1.0, 1.0, 1.0)}, 1.0)])
    assert strategy.steps == 1


# FedBN: batch-norm layers and statistics stay local.
BN_MODEL = {
    "conv.weight": f32(1.0, 1.0),
    "bn1.weight": f32(1.0, 1.0),
    "bn1.running_mean": f32(0.0, 0.0),
    "bn1.num_batches_tracked": f32(10.0),
    "layer1.downsample.1.weight": f32(1.0),      # BN by its running_var sibling
    "layer1.downsample.1.running_var": f32(1.0),
    "head.norm.weight": f32(2.0),                # local by configuration
    "fc.bias": f32(0.0, 0.0, 0.0),
}


def test_fedbn_keeps_batch_norm_out() -> None:
    strategy = FedBN(local_names=["head.norm"])
    assert strategy.shared_names(BN_MODEL) == ["conv.weight", "fc.bias"]
    updates = [
        # the first client also sends its BN delta: ignored
        ({"conv.weight": f32(1.0, -1.0), "fc.bias": f32(0.0, 3.0, 3.0),
          "bn1.weight": f32(100.0, 100.0)}, 2.0),
        ({"conv.weight": f32(-2.0, 2.0), "fc.bias": f32(3.0, 0.0, 3.0)}, 1.0),
    ]
    # conv: 1 + (2 [1, -1] + [-2, 2]) / 3 = [1, 1];  fc: (2 [0, 3, 3] + [3, 0, 3]) / 3 = [1, 2, 3]
    result = run_round(strategy, BN_MODEL, updates)
    assert_weights({k: result[k] for k in ("conv.weight", "fc.bias")},
                   {"conv.weight": [1.0, 1.0], "fc.bias": [1.0, 2.0, 3.0]})
    for name in BN_MODEL.keys() - {"conv.weight", "fc.bias"}:
        assert result[name] is BN_MODEL[name], name


@pytest.mark.parametrize(
    ("name", "local"),
    [("bn.weight", True), ("layer1.0.bn2.bias", True), ("features.1.running_mean", True),
     ("encoder/BatchNorm2d_3/beta", True), ("block.batch_norm.weight", True),
     ("x.num_batches_tracked", True), ("conv.weight", False), ("bnorm.weight", False),
     ("embedding.weight", False), ("fc.bias", False)],
)
def test_batch_norm_names(name: str, local: bool) -> None:
    assert is_batch_norm(name) is local


# Robust aggregators.


def test_median_hand_computed() -> None:
    zero = {"w": np.zeros(4, np.float32)}
    updates = [({"w": f32(1.0, 5.0, -2.0, 0.0)}, 1000.0),  # weights are ignored
               ({"w": f32(2.0, -1.0, 0.0, 0.0)}, 1.0),
               ({"w": f32(100.0, 0.0, 1.0, 0.0)}, 1.0)]
    assert CoordinateMedian.buffers
    assert_weights(run_round(CoordinateMedian(), zero, updates), {"w": [2.0, 0.0, 0.0, 0.0]})
    # four clients: the mean of the two middle values
    updates.append(({"w": f32(3.0, 1.0, 1.0, 4.0)}, 1.0))
    assert_weights(run_round(CoordinateMedian(), zero, updates), {"w": [2.5, 0.5, 0.5, 0.0]})


def test_trimmed_mean_drops_outliers() -> None:
    base = {"w": f32(1.0, 1.0)}
    updates = [({"w": f32(1.0, -1000.0)}, 1.0), ({"w": f32(2.0, 0.0)}, 1.0),
               ({"w": f32(3.0, 1.0)}, 1.0), ({"w": f32(1000.0, 2.0)}, 50.0)]
    # beta 0.25 of 4 clients: drop 1 per side -> [2.5, 0.5]
    assert TrimmedMean.buffers
    assert_weights(run_round(TrimmedMean(beta=0.25), base, updates), {"w": [3.5, 1.5]})
    # beta 0.2 of 4: floor(0.8) = 0 dropped -> the plain unweighted mean [251.5, -249.25]
    assert_weights(run_round(TrimmedMean(beta=0.2), base, updates), {"w": [252.5, -248.25]})


# Krum: four honest clients near [1, 1] and one Byzantine, f = 1, n = 5 = 2f + 3.
#   a = [1, 1], b = [1.1, 0.9], c = [0.9, 1.0], d = [1.0, 1.2]
#   squared distances: ab 0.02, ac 0.01, ad 0.04, bc 0.05, bd 0.10, cd 0.05
#   scores (n - f - 2 = 2 nearest): a 0.03, b 0.07, c 0.06, d 0.09, Byzantine huge
HONEST = [f32(1.0, 1.0), f32(1.1, 0.9), f32(0.9, 1.0), f32(1.0, 1.2)]
BYZANTINE = f32(100.0, -100.0)


def krum_updates() -> list[tuple[Arrays, float]]:
    return [({"w": HONEST[0]}, 1.0), ({"w": BYZANTINE}, 1000.0), ({"w": HONEST[1]}, 1.0),
            ({"w": HONEST[2]}, 3.0), ({"w": HONEST[3]}, 1.0)]


def test_krum_picks_the_honest_cluster() -> None:
    strategy = make_strategy("krum", {"num_byzantine": 1})
    assert isinstance(strategy, Krum) and strategy.buffers
    result = run_round(strategy, {"w": f32(0.0, 0.0)}, krum_updates())
    assert_weights(result, {"w": [1.0, 1.0]})
    assert strategy.selected == [0]
    np.testing.assert_allclose(strategy.scores[0], 0.03, rtol=1e-5)
    np.testing.assert_allclose([strategy.scores[i] for i in (2, 3, 4)], [0.07, 0.06, 0.09],
                               rtol=1e-5)
    assert strategy.scores[1] > 1e4


def test_multikrum_averages_the_best() -> None:
    strategy = MultiKrum(num_byzantine=1)  # m = n - f = 4: every honest client, equal weights
    result = run_round(strategy, {"w": f32(0.0, 0.0)}, krum_updates())
    # (a + b + 3c + d) / 6 = ([1, 1] + [1.1, 0.9] + [2.7, 3.0] + [1.0, 1.2]) / 6
    assert_weights(result, {"w": [5.8 / 6, 6.1 / 6]})
    assert sorted(strategy.selected) == [0, 2, 3, 4]
    two = MultiKrum(num_byzantine=1, num_selected=2)  # a and c: (a + 3c) / 4
    assert_weights(run_round(two, {"w": f32(0.0, 0.0)}, krum_updates()), {"w": [0.925, 1.0]})
    assert two.selected == [0, 3]


def test_krum_warns_below_its_guarantee(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cloud.fl.robust"):
        result = run_round(Krum(num_byzantine=1), {"w": f32(0.0)},
                           [({"w": f32(1.0)}, 1.0), ({"w": f32(1.2)}, 1.0)])
    assert "2f+3" in caplog.text
    assert result["w"][0] in (np.float32(1.0), np.float32(1.2))
    single = run_round(Krum(), {"w": f32(0.0)}, [({"w": f32(7.0)}, 1.0)])
    assert_weights(single, {"w": [7.0]})


# ----------------------------------------------------- float64 references


def random_model(rng: np.random.Generator) -> Arrays:
    return {"conv": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
            "fc": rng.standard_normal((64, 40)).astype(np.float32),
            "bias": rng.standard_normal(40).astype(np.float32)}


def random_updates(rng: np.random.Generator, model: Arrays, n: int,
                   ) -> list[tuple[Arrays, float]]:
    return [({k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
              for k, v in model.items()}, float(rng.integers(1, 500))) for _ in range(n)]


def reference_mean(updates: list[tuple[Arrays, float]], name: str) -> np.ndarray:
    total = sum(w for _, w in updates)
    return sum((d[name].astype(np.float64) * w for d, w in updates), np.zeros(1)) / total


def float32_rounding(updates: list[tuple[Arrays, float]], name: str,
                     base: np.ndarray) -> np.ndarray:
    """Error bound of a float32 weighted sum: n * eps32 * the magnitudes summed."""
    total = sum(w for _, w in updates)
    magnitude = sum((np.abs(d[name].astype(np.float64)) * w for d, w in updates),
                    np.zeros(1)) / total
    eps = float(np.finfo(np.float32).eps)
    return 2 * (len(updates) + 2) * eps * (np.abs(base.astype(np.float64)) + magnitude)


@pytest.mark.parametrize("make", [FedAvg, lambda: FedProx(proximal_mu=0.1), FedBN])
def test_averaging_matches_float64_reference(make: Callable[[], Strategy]) -> None:
    rng = np.random.default_rng(11)
    model = random_model(rng)
    updates = random_updates(rng, model, 40)
    result = run_round(make(), model, updates)
    for name, x in model.items():
        expected = x.astype(np.float64) + reference_mean(updates, name)
        error = np.abs(result[name].astype(np.float64) - expected)
        assert np.all(error <= float32_rounding(updates, name, x)), float(error.max())
        assert float(np.median(error / (np.abs(expected) + 1e-12))) < 1e-6


def test_server_optimizers_match_float64_reference() -> None:
    rng = np.random.default_rng(12)
    model = random_model(rng)
    rounds = [random_updates(rng, model, 10) for _ in range(3)]
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    for cls in (FedAdam, FedYogi, FedAdagrad):
        strategy = cls(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
        x = {k: v.astype(np.float64) for k, v in model.items()}
        m = {k: np.zeros_like(v) for k, v in x.items()}
        v = {k: np.full_like(a, tau**2) for k, a in x.items()}
        weights = model
        for updates in rounds:
            weights = run_round(strategy, weights, updates)
            for name in model:
                d = reference_mean(updates, name)
                m[name] = b1 * m[name] + (1 - b1) * d
                if cls is FedAdam:
                    v[name] = b2 * v[name] + (1 - b2) * d**2
                elif cls is FedYogi:
                    v[name] = v[name] - (1 - b2) * d**2 * np.sign(v[name] - d**2)
                else:
                    v[name] = v[name] + d**2
                x[name] = x[name] + eta * m[name] / (np.sqrt(v[name]) + tau)
        for name, expected in x.items():
            np.testing.assert_allclose(weights[name], expected, rtol=1e-6, atol=1e-6 * eta,
                                       err_msg=f"{cls.name} {name}")


def test_float32_accumulation_is_supported_but_less_exact() -> None:
    rng = np.random.default_rng(13)
    updates = [rng.standard_normal(20_000).astype(np.float32) for _ in range(50)]
    weights = [float(w) for w in rng.integers(1, 1000, 50)]
    reference = sum((u.astype(np.float64) * w for u, w in zip(updates, weights, strict=True)),
                    np.zeros(1)) / sum(weights)
    errors = {}
    for dtype in (np.float64, np.float32):
        acc = WeightedSum({"u": (20_000,)}, dtype=dtype, block=4096)
        for u, w in zip(updates, weights, strict=True):
            acc.add({"u": u}, w)
        mean = acc.mean()["u"]
        assert mean.dtype == np.float32
        errors[dtype] = float(np.max(np.abs(mean - reference) / np.abs(reference)))
    assert errors[np.float64] < 1e-6
    assert errors[np.float32] > errors[np.float64]


# ------------------------------------------------------------ memory


def test_fedavg_streaming_memory_stays_below_three_models() -> None:
    size = 1_000_000
    model_bytes = 4 * size
    rng = np.random.default_rng(14)
    global_weights = {"w": rng.standard_normal(size).astype(np.float32)}
    pool = [rng.standard_normal(size).astype(np.float32) for _ in range(2)]
    strategy = FedAvg()
    tracemalloc.start()
    try:
        strategy.begin_round(global_weights)
        strategy.add({"w": pool[0]}, 1.0)
        _, after_one = tracemalloc.get_traced_memory()
        for i in range(1, 50):
            strategy.add({"w": pool[i % 2]}, float(i + 1))
        _, after_fifty = tracemalloc.get_traced_memory()
        result = strategy.finalize()
        _, with_finalize = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after_fifty < 3 * model_bytes, after_fifty / model_bytes
    assert after_fifty < after_one + 64 * 1024  # nothing grows with the number of clients
    assert with_finalize < 3.25 * model_bytes, with_finalize / model_bytes
    total = sum(range(1, 51))
    odd, even = (p.astype(np.float64) for p in pool)
    expected = global_weights["w"] + (
        odd * sum(range(1, 51, 2)) + even * sum(range(2, 51, 2))
    ) / total
    magnitude = (np.abs(odd) * sum(range(1, 51, 2)) + np.abs(even) * sum(range(2, 51, 2))) / total
    bound = 2 * 52 * float(np.finfo(np.float32).eps) * (np.abs(global_weights["w"]) + magnitude)
    assert np.all(np.abs(result["w"] - expected) <= bound)


# ------------------------------------------------------------ lifecycle


def test_round_lifecycle_errors() -> None:
    strategy = FedAvg()
    with pytest.raises(RoundStateError):
        strategy.add({"w": f32(1.0)}, 1.0)
    with pytest.raises(RoundStateError):
        strategy.finalize()
    strategy.begin_round({"w": f32(1.0, 2.0)})
    with pytest.raises(NoUpdatesError):
        strategy.finalize()
    bad: list[tuple[dict[str, object], float, str]] = [
        ({"w": f32(1.0)}, 1.0, "shape_mismatch"),
        ({}, 1.0, "missing_tensor"),
        ({"w": f32(1.0, 1.0), "v": f32(1.0)}, 1.0, "extra_tensor"),
        ({"w": np.ones(2)}, 1.0, "dtype_mismatch"),
        ({"w": [1.0, 1.0]}, 1.0, "dtype_mismatch"),
        ({"w": f32(1.0, 1.0)}, 0.0, "bad_weight"),
        ({"w": f32(1.0, 1.0)}, math.nan, "bad_weight"),
        ({"w": f32(1.0, 1.0)}, math.inf, "bad_weight"),
    ]
    for delta, weight, reason in bad:
        with pytest.raises(IncompatibleUpdateError) as info:
            strategy.add(delta, weight)  # type: ignore[arg-type]
        assert info.value.reason == reason
    assert strategy.count == 0
    strategy.add({"w": f32(1.0, 1.0)}, 2)
    assert_weights(strategy.finalize(), {"w": [2.0, 3.0]})
    with pytest.raises(RoundStateError):
        strategy.add({"w": f32(1.0, 1.0)}, 1.0)
    with pytest.raises(IncompatibleUpdateError, match="float32"):
        strategy.begin_round({"w": np.ones(2)})


def test_finalize_does_not_modify_inputs() -> None:
    model = {"w": f32(1.0, 2.0)}
    delta = {"w": f32(0.5, 0.5)}
    for name in STRATEGIES:
        strategy = make_strategy(name, {"proximal_mu": 0.1} if name == "fedprox" else {})
        # SCAFFOLD's update carries the device's control-variate change too.
        sent = with_control(delta, {"w": f32(0.0, 0.0)}) if name == "scaffold" else delta
        strategy.begin_round(model)
        strategy.add(sent, 1.0, local_steps=3)
        result = strategy.finalize()
        assert result["w"] is not model["w"]
        np.testing.assert_array_equal(model["w"], f32(1.0, 2.0))
        np.testing.assert_array_equal(delta["w"], f32(0.5, 0.5))


# ------------------------------------------------------------ validation


def test_validation_accepts_a_good_update() -> None:
    model = {"w": f32(1.0, 2.0), "b": f32(0.0)}
    assert validate_update({"w": f32(3.0, 0.0), "b": f32(4.0)}, model, max_norm=5.0) is None
    assert validate_update({"w": f32(3.0, 0.0), "b": f32(4.0)}, model) is None
    # FedBN-style: only the shared names are required, local ones are tolerated
    assert validate_update({"w": f32(0.0, 0.0)}, model, names=["w"]) is None
    assert validate_update({"w": f32(0.0, 0.0), "b": f32(9.0)}, model, names=["w"],
                           max_norm=1.0) is None


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"w": f32(1.0, 2.0)}, RejectReason.MISSING_TENSOR),
        ({"w": f32(1.0, 2.0), "b": f32(0.0), "x": f32(1.0)}, RejectReason.EXTRA_TENSOR),
        ({"w": f32(1.0, 2.0, 3.0), "b": f32(0.0)}, RejectReason.SHAPE_MISMATCH),
        ({"w": f32(1.0, 2.0).reshape(2, 1), "b": f32(0.0)}, RejectReason.SHAPE_MISMATCH),
        ({"w": np.ones(2), "b": f32(0.0)}, RejectReason.DTYPE_MISMATCH),
        ({"w": [1.0, 2.0], "b": f32(0.0)}, RejectReason.DTYPE_MISMATCH),
        ({"w": f32(1.0, math.nan), "b": f32(0.0)}, RejectReason.NON_FINITE),
        ({"w": f32(1.0, 2.0), "b": f32(-math.inf)}, RejectReason.NON_FINITE),
        ({"w": f32(3.0, 4.0), "b": f32(0.1)}, RejectReason.NORM_BOUND),
        ({"w": f32(3e30, 4e30), "b": f32(0.0)}, RejectReason.NORM_BOUND),  # overflows float32
    ],
)
def test_validation_rejections(delta: dict[str, object], reason: RejectReason) -> None:
    model = {"w": f32(1.0, 2.0), "b": f32(0.0)}
    rejection = validate_update(delta, model, max_norm=5.0)
    assert rejection is not None
    assert rejection.reason is reason
    wire = rejection.to_wire("dev-1")
    assert wire.reason == reason.value and wire.device_id == "dev-1"


# ------------------------------------------------------------ registry


def test_registry_names_and_round_trip() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                               "fedprox", "fedbn", "median", "trimmed_mean", "krum",
                               "multikrum", "scaffold", "fednova"}
    for name, cls in STRATEGIES.items():
        params: dict[str, object] = {"proximal_mu": 0.1} if name == "fedprox" else {}
        strategy = make_strategy(name, params)
        assert type(strategy) is cls and strategy.name == name
        assert strategy.buffers == (name in {"median", "trimmed_mean", "krum", "multikrum"})
        again = make_strategy(name, strategy.config())
        assert again.config() == strategy.config()
    assert make_strategy("fedadam", {"eta": 1, "tau": 0.01}).config()["eta"] == 1.0


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedprox", {}),
        ("fedavg", {"eta": 0.1}),
        ("fedadam", {"eta": -0.1}),
        ("fedadam", {"eta": "0.1"}),
        ("fedadam", {"tau": math.nan}),
        ("fedyogi", {"beta_1": 1.0}),
        ("fedavgm", {"momentum": True}),
        ("fedprox", {"proximal_mu": -1.0}),
        ("fedbn", {"local_names": "bn"}),
        ("fedbn", {"local_names": ["ok", 3]}),
        ("trimmed_mean", {"beta": 0.5}),
        ("krum", {"num_byzantine": -1}),
        ("krum", {"num_byzantine": 1.5}),
        ("krum", {"num_selected": 2}),
        ("multikrum", {"num_selected": 0}),
        ("multikrum", {1: 2}),
    ],
)
def test_make_strategy_bad_params(name: str, params: dict[str, object]) -> None:
    with pytest.raises(StrategyConfigError) as info:
        make_strategy(name, params)
    assert info.value.strategy == name


def test_make_strategy_unknown_name() -> None:
    with pytest.raises(UnknownStrategyError, match="fedavg") as info:
        make_strategy("fedsgd", {})
    assert isinstance(info.value, StrategyConfigError)
