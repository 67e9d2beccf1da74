"""Update compression: round trips, error feedback, malformed payloads, fuzzing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.codec import decode, encode
from schemas.compression import (
    CompressionError,
    compress,
    decompress,
    topk_count,
    wire_bytes,
)
from schemas.errors import SchemaError
from schemas.fl import Compression, UpdateEnvelope

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32) * 1e-3,
        "fc.weight": rng.standard_normal((10, 36)).astype(np.float32),
        "scalar": np.array(0.25, dtype=np.float32),
        "zeros": np.zeros(5, np.float32),
    }


def _through_wire(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    envelope = UpdateEnvelope(task="t", round=1, device_id="d", base_version="v1",
                              num_examples=1, sent_at=1.7e9)
    return decode(encode(tensors, envelope), UpdateEnvelope).tensors


def test_none_is_lossless_and_float32() -> None:
    delta = _delta()
    sent = compress(delta, Compression.NONE)
    assert set(sent.tensors) == set(delta)
    restored = decompress(_through_wire(sent.tensors), Compression.NONE)
    for name, value in delta.items():
        np.testing.assert_array_equal(restored[name], value)
        assert restored[name].dtype == np.float32
        assert not sent.residual[name].any()
    assert sent.nbytes == wire_bytes(delta)


def test_fp16_round_trip_within_1e3_relative() -> None:
    delta = _delta()
    sent = compress(delta, Compression.FP16)
    assert all(t.dtype == np.float16 for t in sent.tensors.values())
    restored = decompress(_through_wire(sent.tensors), Compression.FP16)
    for name, value in delta.items():
        assert restored[name].dtype == np.float32
        np.testing.assert_allclose(restored[name], value, rtol=1e-3, atol=0)
        np.testing.assert_array_equal(sent.residual[name], value - restored[name])
    assert sent.nbytes * 2 == wire_bytes(delta)


def test_int8_round_trip_within_half_a_step() -> None:
    delta = _delta()
    sent = compress(delta, Compression.INT8)
    assert sent.tensors["fc.weight::q"].dtype == np.int8
    assert sent.tensors["fc.weight::scale"].shape == (1,)
    restored = decompress(_through_wire(sent.tensors), Compression.INT8)
    assert set(restored) == set(delta)
    for name, value in delta.items():
        scale = float(sent.tensors[f"{name}::scale"][0])
        assert scale == pytest.approx(float(np.abs(value).max()) / 127, rel=1e-6)
        assert restored[name].shape == value.shape
        assert restored[name].dtype == np.float32
        error = np.abs(restored[name].astype(np.float64) - value)
        assert (error <= scale / 2 * (1 + 1e-5) + 1e-12).all(), name
        np.testing.assert_allclose(sent.residual[name], value - restored[name], atol=1e-7)
    assert not restored["zeros"].any()
    # about a quarter of the float32 bytes, plus one scale per tensor
    assert sent.nbytes == sum(v.size for v in delta.values()) + 4 * len(delta)


def test_topk_keeps_the_largest_coordinates_exactly_and_zero_elsewhere() -> None:
    rng = np.random.default_rng(1)
    # integers in [-127, 127] with max |x| = 127: scale 1, so quantization is exact
    values = rng.permutation(np.arange(-127, 128)).astype(np.float32)[:200].reshape(10, 20)
    values[0, 0] = 127.0
    sent = compress({"w": values}, Compression.TOPK_INT8, topk_fraction=0.1)
    k = topk_count(values.size, 0.1)
    assert k == 20
    parts = sent.tensors
    assert parts["w::idx"].dtype == np.int32 and parts["w::idx"].shape == (k,)
    assert parts["w::val"].dtype == np.int8
    assert parts["w::scale"][0] == pytest.approx(1.0)
    assert parts["w::shape"].tolist() == [10, 20]
    restored = decompress(_through_wire(parts), Compression.TOPK_INT8)["w"]
    top = np.argsort(-np.abs(values).reshape(-1), kind="stable")[:k]
    expected = np.zeros(values.size, np.float32)
    expected[top] = values.reshape(-1)[top]
    np.testing.assert_array_equal(restored, expected.reshape(10, 20))
    np.testing.assert_array_equal(sent.residual["w"], values - restored)


def test_topk_on_random_deltas_within_half_a_step() -> None:
    delta = _delta(3)
    sent = compress(delta, Compression.TOPK_INT8, topk_fraction=0.25)
    restored = decompress(_through_wire(sent.tensors), Compression.TOPK_INT8)
    for name, value in delta.items():
        flat, out = value.reshape(-1), restored[name].reshape(-1)
        k = topk_count(value.size, 0.25)
        kept = np.sort(sent.tensors[f"{name}::idx"])
        assert kept.size == k
        threshold = np.sort(np.abs(flat))[::-1][k - 1] if k else 0.0
        assert (np.abs(flat[kept]) >= threshold).all()
        scale = float(sent.tensors[f"{name}::scale"][0])
        assert (np.abs(out[kept] - flat[kept]) <= scale / 2 * (1 + 1e-5) + 1e-12).all()
        others = np.setdiff1d(np.arange(flat.size), kept)
        assert not out[others].any()
    assert restored["scalar"] == pytest.approx(0.25, rel=1e-2)


@pytest.mark.parametrize("kind", [Compression.INT8, Compression.TOPK_INT8, Compression.FP16])
def test_error_feedback_tracks_the_sum_of_true_deltas(kind: Compression) -> None:
    rng = np.random.default_rng(7)
    drift = rng.standard_normal(500).astype(np.float32) * 0.1
    residual: dict[str, np.ndarray] | None = None
    true_sum = np.zeros(500)
    sent_sum = np.zeros(500)
    plain_sum = np.zeros(500)
    rounds = 200
    for _ in range(rounds):
        delta = {"w": drift + rng.standard_normal(500).astype(np.float32)}
        sent = compress(delta, kind, topk_fraction=0.05, residual=residual)
        residual = sent.residual
        sent_sum += decompress(sent.tensors, kind)["w"]
        true_sum += delta["w"]
        plain = compress(delta, kind, topk_fraction=0.05)
        plain_sum += decompress(plain.tensors, kind)["w"]
        # sum of what was sent = sum of true deltas - the residual still held
        assert residual is not None
        np.testing.assert_allclose(sent_sum + residual["w"], true_sum, atol=1e-3)
    assert residual is not None
    error = np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum)
    plain_error = np.linalg.norm(plain_sum - true_sum) / np.linalg.norm(true_sum)
    limit = 0.15 if kind is Compression.TOPK_INT8 else 0.01
    assert error < limit
    if kind is Compression.TOPK_INT8:
        assert plain_error > 0.5  # without feedback most of the signal is lost
        assert error < plain_error / 5


def test_error_feedback_error_stays_bounded() -> None:
    rng = np.random.default_rng(8)
    residual: dict[str, np.ndarray] | None = None
    norms = []
    for _ in range(300):
        delta = {"w": rng.standard_normal(1000).astype(np.float32)}
        sent = compress(delta, Compression.TOPK_INT8, topk_fraction=0.1, residual=residual)
        residual = sent.residual
        norms.append(float(np.linalg.norm(residual["w"])))
    assert max(norms[150:]) < 2 * max(norms[50:150])


def test_compress_refuses_bad_input() -> None:
    good = {"w": np.ones(3, np.float32)}
    with pytest.raises(CompressionError) as info:
        compress(good, Compression.TOPK_INT8)
    assert info.value.reason == "bad_fraction"
    for fraction in (0.0, 1.5, math.nan, True):
        with pytest.raises(CompressionError, match="bad_fraction"):
            compress(good, Compression.TOPK_INT8, topk_fraction=fraction)
    with pytest.raises(CompressionError, match="non_finite"):
        compress({"w": np.array([1.0, np.nan], np.float32)}, Compression.INT8)
    with pytest.raises(CompressionError, match="fp16_overflow"):
        compress({"w": np.array([1e6], np.float32)}, Compression.FP16)
    with pytest.raises(CompressionError, match="bad_dtype"):
        compress({"w": np.ones(3, np.int32)}, Compression.INT8)
    with pytest.raises(CompressionError, match="bad_residual"):
        compress(good, Compression.INT8, residual={"w": np.ones(4, np.float32)})
    with pytest.raises(CompressionError, match="bad_residual"):
        compress(good, Compression.INT8, residual={})
    with pytest.raises(CompressionError, match="bad_residual"):
        compress(good, Compression.INT8, residual={"w": np.ones(3), "v": np.ones(1)})
    with pytest.raises(CompressionError, match="bad_name"):
        compress({"": np.ones(3, np.float32)}, Compression.NONE)
    assert issubclass(CompressionError, SchemaError)


def test_compress_leaves_the_inputs_untouched() -> None:
    delta = _delta()
    residual = {k: np.full_like(v, 0.5) for k, v in delta.items()}
    before = {k: v.copy() for k, v in delta.items()}
    compress(delta, Compression.TOPK_INT8, topk_fraction=0.5, residual=residual)
    for name in delta:
        np.testing.assert_array_equal(delta[name], before[name])
        assert (residual[name] == 0.5).all()


def test_names_containing_the_separator_round_trip() -> None:
    delta = {"a::q": np.arange(4, dtype=np.float32), "a": np.ones(2, np.float32)}
    for kind in (Compression.INT8, Compression.TOPK_INT8):
        sent = compress(delta, kind, topk_fraction=1.0)
        restored = decompress(sent.tensors, kind)
        assert set(restored) == {"a::q", "a"}
        np.testing.assert_allclose(restored["a::q"], delta["a::q"], atol=3 / 127)


def _topk_parts() -> dict[str, np.ndarray]:
    return {
        "w::idx": np.array([0, 3], np.int32),
        "w::val": np.array([5, -7], np.int8),
        "w::scale": np.array([0.5], np.float32),
        "w::shape": np.array([2, 2], np.int32),
    }


def test_valid_topk_payload_decodes() -> None:
    out = decompress(_topk_parts(), Compression.TOPK_INT8)["w"]
    np.testing.assert_array_equal(out, [[2.5, 0.0], [0.0, -3.5]])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"w::idx": np.array([0, 4], np.int32)}, "bad_index"),
        ({"w::idx": np.array([-1, 3], np.int32)}, "bad_index"),
        ({"w::idx": np.array([3, 0], np.int32)}, "bad_index"),
        ({"w::idx": np.array([3, 3], np.int32)}, "bad_index"),
        ({"w::idx": np.array([0, -(2**31), 3], np.int32),
          "w::val": np.array([1, 1, 1], np.int8)}, "bad_index"),
        ({"w::idx": np.array([0, 3], np.int64)}, "bad_dtype"),
        ({"w::idx": np.array([[0, 3]], np.int32)}, "bad_shape"),
        ({"w::val": np.array([5], np.int8)}, "bad_shape"),
        ({"w::val": np.array([5, 7], np.uint8)}, "bad_dtype"),
        ({"w::scale": np.array([np.nan], np.float32)}, "bad_scale"),
        ({"w::scale": np.array([-1.0], np.float32)}, "bad_scale"),
        ({"w::scale": np.array([0.5, 0.5], np.float32)}, "bad_shape"),
        ({"w::scale": np.array([0.5], np.float64)}, "bad_dtype"),
        ({"w::shape": np.array([2, -2], np.int32)}, "bad_shape"),
        ({"w::shape": np.array([1], np.int32)}, "bad_shape"),
        ({"w::shape": np.array([2**31 - 1] * 4, np.int32)}, "too_large"),
        ({"w::shape": np.ones(9, np.int32)}, "bad_shape"),
        ({"w::extra": np.ones(1, np.float32)}, "unexpected_tensor"),
        ({"w": np.ones(1, np.float32)}, "unexpected_tensor"),
        ({"::idx": np.ones(1, np.int32)}, "unexpected_tensor"),
        ({"w::idx": [0, 3]}, "bad_payload"),
    ],
)
def test_malformed_topk_payloads_raise_compression_error(
    change: dict[str, object], reason: str,
) -> None:
    tensors: dict[str, object] = {**_topk_parts(), **change}
    with pytest.raises(CompressionError) as info:
        decompress(tensors, Compression.TOPK_INT8)  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_missing_parts_and_wrong_dtypes_per_kind() -> None:
    parts = _topk_parts()
    del parts["w::shape"]
    with pytest.raises(CompressionError, match="missing_part"):
        decompress(parts, Compression.TOPK_INT8)
    with pytest.raises(CompressionError, match="missing_part"):
        decompress({"w::q": np.ones(3, np.int8)}, Compression.INT8)
    with pytest.raises(CompressionError, match="bad_dtype"):
        decompress({"w::q": np.ones(3, np.int16), "w::scale": np.ones(1, np.float32)},
                   Compression.INT8)
    with pytest.raises(CompressionError, match="bad_dtype"):
        decompress({"w": np.ones(3, np.float16)}, Compression.NONE)
    with pytest.raises(CompressionError, match="bad_dtype"):
        decompress({"w": np.ones(3, np.float32)}, Compression.FP16)
    with pytest.raises(CompressionError, match="bad_dtype"):
        decompress({"w": np.ones(3, ">f4")}, Compression.NONE)
    with pytest.raises(CompressionError, match="bad_kind"):
        decompress({}, "zip")  # type: ignore[arg-type]
    with pytest.raises(CompressionError, match="too_large"):
        decompress({"w": np.ones(10, np.float32)}, Compression.NONE, max_elements=9)
    assert decompress({}, Compression.INT8) == {}


_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8]
_NAMES = st.sampled_from(["w", "b", "w::q", "w::scale", "w::idx", "w::val", "w::shape",
                          "b::q", "b::scale", "::q", "x::", "w::q::scale"])
_ARRAYS = st.sampled_from(_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
)


@FUZZ
@given(tensors=st.dictionaries(_NAMES, _ARRAYS, max_size=6), kind=st.sampled_from(Compression))
def test_fuzz_decompress_random_tensors(tensors: dict[str, np.ndarray], kind: Compression,
                                        ) -> None:
    try:
        out = decompress(tensors, kind, max_elements=10_000)
    except CompressionError:
        return
    for array in out.values():
        assert isinstance(array, np.ndarray)
        assert array.dtype == np.float32


@FUZZ
@given(data=st.data(), kind=st.sampled_from([Compression.INT8, Compression.TOPK_INT8]))
def test_fuzz_decompress_valid_payload_with_one_tensor_replaced(
    data: st.DataObject, kind: Compression,
) -> None:
    sent = compress(_delta(), kind, topk_fraction=0.3).tensors
    name = data.draw(st.sampled_from(sorted(sent)))
    sent[name] = data.draw(_ARRAYS)
    try:
        out = decompress(sent, kind, max_elements=10_000)
    except CompressionError:
        return
    assert all(a.dtype == np.float32 for a in out.values())


@FUZZ
@given(
    values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                      elements=st.floats(-1e4, 1e4, width=32)),
    kind=st.sampled_from(Compression),
    fraction=st.floats(0.01, 1.0),
)
def test_fuzz_round_trip_shapes(values: np.ndarray, kind: Compression, fraction: float) -> None:
    sent = compress({"p": values}, kind, topk_fraction=fraction)
    out = decompress(_through_wire(sent.tensors), kind)["p"]
    assert out.shape == values.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out + sent.residual["p"], values, rtol=1e-5, atol=1e-3)
