"""The safetensors tensor codec: round trips and bounded, typed refusal."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.codec import DTYPES, DecodeLimits, decode, encode, read_header
from schemas.errors import DecodeError, EncodeError
from schemas.fl import GlobalModelEnvelope, UpdateEnvelope
from tests.examples import EXAMPLES

ENVELOPE = EXAMPLES[UpdateEnvelope]
assert isinstance(ENVELOPE, UpdateEnvelope)
WIRE_DTYPES = [np.float32, np.float16, np.int8, np.int32]


def _raw(header: dict[str, object], data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _meta() -> dict[str, str]:
    return {"envelope": ENVELOPE.model_dump_json(), "envelope_type": "UpdateEnvelope"}


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.dictionaries(
        st.from_regex(r"\A[a-z][a-z0-9_.]{0,20}\Z", fullmatch=True),
        st.sampled_from(WIRE_DTYPES).flatmap(
            lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
        ),
        max_size=5,
    )
)
def test_round_trip_dtypes_and_shapes(arrays: dict[str, np.ndarray]) -> None:
    decoded = decode(encode(arrays, ENVELOPE), UpdateEnvelope)
    assert decoded.envelope == ENVELOPE
    assert decoded.tensors.keys() == arrays.keys()
    for name, array in arrays.items():
        out = decoded.tensors[name]
        assert out.dtype == array.dtype
        assert out.shape == array.shape
        np.testing.assert_array_equal(out, array)  # bitwise for NaN-free equal arrays


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    base = np.arange(24, dtype=">f4").reshape(4, 6)
    decoded = decode(encode({"w": base[:, ::2]}, ENVELOPE), UpdateEnvelope)
    np.testing.assert_array_equal(decoded.tensors["w"], base[:, ::2].astype("<f4"))


@pytest.mark.parametrize("array", [np.array(["a"]), np.zeros(2, dtype=np.complex64),
                                   np.array([object()])])
def test_encode_refuses_unsupported_dtypes(array: np.ndarray) -> None:
    with pytest.raises(EncodeError):
        encode({"x": array}, ENVELOPE)


def test_encode_refuses_bad_names() -> None:
    with pytest.raises(EncodeError):
        encode({"__metadata__": np.zeros(1, np.float32)}, ENVELOPE)


def test_wrong_envelope_type_is_refused() -> None:
    payload = encode({"w": np.zeros(3, np.float32)}, ENVELOPE)
    with pytest.raises(DecodeError) as info:
        decode(payload, GlobalModelEnvelope)
    assert info.value.reason == "wrong_envelope"


def test_missing_or_invalid_envelope_is_refused() -> None:
    with pytest.raises(DecodeError) as missing:
        decode(_raw({"__metadata__": {}}), UpdateEnvelope)
    assert missing.value.reason == "no_envelope"
    bad = json.loads(ENVELOPE.model_dump_json()) | {"num_examples": -1}
    with pytest.raises(DecodeError) as invalid:
        decode(_raw({"__metadata__": {"envelope": json.dumps(bad)}}), UpdateEnvelope)
    assert invalid.value.reason == "validation"


@pytest.mark.parametrize(("header", "data", "reason"), [
    ({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0", "bad_dtype"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad_shape"),
    ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "bad_shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "bad_shape"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "bad_header"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "bad_header"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad_header"),
    ({"w": [1, 2]}, b"", "bad_header"),
    ({"w": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, "bad_shape"),
])
def test_malformed_headers_are_refused(header: dict[str, object], data: bytes,
                                       reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(_raw({"__metadata__": _meta(), **header}, data), UpdateEnvelope)
    assert info.value.reason == reason


def test_huge_declared_shape_allocates_nothing() -> None:
    header = {"__metadata__": _meta(),
              "w": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}
    payload = _raw(header, b"\0" * 8)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode(payload, UpdateEnvelope)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "bad_shape"
    assert peak < 256 * 1024


def test_limits_bound_payload_header_and_tensor_count() -> None:
    payload = encode({f"t{i}": np.zeros(4, np.float32) for i in range(10)}, ENVELOPE)
    with pytest.raises(DecodeError) as size:
        decode(payload, UpdateEnvelope, DecodeLimits(max_bytes=len(payload) - 1))
    assert size.value.reason == "too_large"
    with pytest.raises(DecodeError) as count:
        decode(payload, UpdateEnvelope, DecodeLimits(max_tensors=9))
    assert count.value.reason == "bad_header"
    with pytest.raises(DecodeError) as header:
        decode(payload, UpdateEnvelope, DecodeLimits(max_header_bytes=100))
    assert header.value.reason == "bad_header"
    with pytest.raises(DecodeError) as trunc:
        decode(struct.pack("<Q", 10**9) + b"{}", UpdateEnvelope)
    assert trunc.value.reason == "bad_header"
    with pytest.raises(DecodeError) as short:
        decode(b"\x01\x02", UpdateEnvelope)
    assert short.value.reason == "truncated"


def test_decoded_size_is_bounded_by_the_payload() -> None:
    arrays = {"w": np.ones((256, 256), np.float32)}
    payload = encode(arrays, ENVELOPE)
    infos, _ = read_header(payload)
    assert sum(i.end - i.begin for i in infos) <= len(payload)
    assert decode(payload, UpdateEnvelope).nbytes == 256 * 256 * 4


def test_every_wire_dtype_is_listed() -> None:
    assert {np.dtype(d).str for d in WIRE_DTYPES} <= {d.str for d in DTYPES.values()}
