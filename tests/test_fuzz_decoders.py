"""Fuzzing every decoder: only the typed DecodeError ever comes out."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.base import decode_message
from schemas.codec import DecodeLimits, decode, encode
from schemas.errors import DecodeError
from schemas.fl import GlobalModelEnvelope, UpdateEnvelope
from tests.examples import EXAMPLES

MODELS = list(EXAMPLES)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = DecodeLimits(max_bytes=1 << 20, max_header_bytes=64 * 1024)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _decodes_or_refuses(model: type[BaseModel], payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_message(model, payload)


@FUZZ
@given(model=st.sampled_from(MODELS), payload=st.binary(max_size=2048))
def test_random_bytes(model: type[BaseModel], payload: bytes) -> None:
    _decodes_or_refuses(model, payload)


@FUZZ
@given(model=st.sampled_from(MODELS), data=st.data())
def test_valid_messages_with_one_field_replaced(model: type[BaseModel], data: st.DataObject,
                                                ) -> None:
    body = json.loads(EXAMPLES[model].model_dump_json())
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    _decodes_or_refuses(model, json.dumps(body, allow_nan=True).encode())


@FUZZ
@given(model=st.sampled_from(MODELS), cut=st.integers(min_value=0, max_value=2000))
def test_truncated_messages(model: type[BaseModel], cut: int) -> None:
    payload = EXAMPLES[model].model_dump_json().encode()
    _decodes_or_refuses(model, payload[: cut % (len(payload) + 1)])


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_oversized_and_deeply_nested(model: type[BaseModel]) -> None:
    for payload in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                    b"9" * 300_000):
        with pytest.raises(DecodeError):
            decode_message(model, payload)


def _update_payload() -> bytes:
    arrays: dict[str, np.ndarray] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(3, np.int8),
    }
    return encode(arrays, EXAMPLES[UpdateEnvelope])


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_codec_random_bytes(payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(payload, UpdateEnvelope, SMALL)


@FUZZ
@given(data=st.data())
def test_codec_mutated_valid_payloads(data: st.DataObject) -> None:
    payload = bytearray(_update_payload())
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(payload) - 1))
        payload[index] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    with contextlib.suppress(DecodeError):
        decode(bytes(payload), UpdateEnvelope, SMALL)


@FUZZ
@given(
    dtype=st.text(max_size=5) | st.sampled_from(["F32", "F16", "I8", "I32", "F64", "BOOL"]),
    shape=st.lists(st.integers(-(2**70), 2**70), max_size=10)
    | st.lists(st.floats(allow_nan=True), max_size=3),
    begin=st.integers(-(2**70), 2**70),
    end=st.integers(-(2**70), 2**70),
    data_len=st.integers(0, 64),
    envelope_type=st.sampled_from([UpdateEnvelope, GlobalModelEnvelope]),
)
def test_codec_hostile_headers(dtype: str, shape: list[float], begin: int, end: int,
                               data_len: int, envelope_type: type[BaseModel]) -> None:
    header = {
        "__metadata__": {"envelope": EXAMPLES[envelope_type].model_dump_json()},
        "t": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]},
    }
    body = json.dumps(header).encode()
    payload = struct.pack("<Q", len(body)) + body + b"\0" * data_len
    with contextlib.suppress(DecodeError):
        decode(payload, envelope_type, SMALL)


def _fields_of(model: type[BaseModel], kind: type) -> list[str]:
    body = json.loads(EXAMPLES[model].model_dump_json())
    return sorted(k for k, v in body.items() if type(v) is kind and k in model.model_fields)


INT_MODELS = [m for m in MODELS if _fields_of(m, int)]
FLOAT_MODELS = [m for m in MODELS if _fields_of(m, float)]


@FUZZ
@given(model=st.sampled_from(INT_MODELS), data=st.data())
def test_integers_are_strict_and_fit_int64(model: type[BaseModel], data: st.DataObject,
                                           ) -> None:
    body = json.loads(EXAMPLES[model].model_dump_json())
    key = data.draw(st.sampled_from(_fields_of(model, int)))
    body[key] = data.draw(st.sampled_from([
        True, False, "1", str(body[key]), float(body[key]) + 0.5, 2**63, 2**64,
        -(2**63) - 1, 10**30, None if key in ("seq", "bd_seq", "round") else [1],
    ]))
    with pytest.raises(DecodeError):
        decode_message(model, json.dumps(body).encode())


@FUZZ
@given(model=st.sampled_from(FLOAT_MODELS), data=st.data())
def test_floats_are_finite_numbers_only(model: type[BaseModel], data: st.DataObject) -> None:
    body = json.loads(EXAMPLES[model].model_dump_json())
    key = data.draw(st.sampled_from(_fields_of(model, float)))
    body[key] = data.draw(st.sampled_from([True, "1.5", float("nan"), float("inf"),
                                           float("-inf"), {"x": 1}]))
    with pytest.raises(DecodeError):
        decode_message(model, json.dumps(body, allow_nan=True).encode())


@pytest.mark.parametrize("digits", [4_300, 5_000, 100_000])
def test_codec_huge_integers_in_the_header_are_a_decode_error(digits: int) -> None:
    envelope = json.dumps(EXAMPLES[UpdateEnvelope].model_dump_json())
    for spec in (f'{{"dtype":"F32","shape":[{"9" * digits}],"data_offsets":[0,4]}}',
                 f'{{"dtype":"F32","shape":[1],"data_offsets":[0,{"9" * digits}]}}'):
        body = f'{{"__metadata__":{{"envelope":{envelope}}},"t":{spec}}}'.encode()
        payload = struct.pack("<Q", len(body)) + body + b"\0" * 4
        with pytest.raises(DecodeError):
            decode(payload, UpdateEnvelope, DecodeLimits(max_bytes=1 << 20,
                                                         max_header_bytes=1 << 20))
