"""The tensor codec: a named set of numpy arrays plus a JSON envelope, as safetensors.

Layout (the safetensors format): 8-byte little-endian header length ``N``, ``N``
bytes of JSON header (tensor name -> dtype, shape, byte offsets, plus
``__metadata__``), then the raw tensor bytes. The envelope (a pydantic model)
travels as JSON in ``__metadata__["envelope"]``.

Decoding untrusted bytes never executes code (no pickle anywhere) and never
allocates more than :attr:`DecodeLimits.max_bytes` for tensor data: the header
is parsed and checked here (size, dtypes, shapes, offsets, element counts)
before safetensors copies a single byte, and everything malformed raises
:class:`~schemas.errors.DecodeError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import numpy as np
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from schemas.base import decode_message
from schemas.errors import DecodeError, EncodeError

E = TypeVar("E", bound=BaseModel)

ENVELOPE_KEY: Final = "envelope"
ENVELOPE_TYPE_KEY: Final = "envelope_type"

DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U32": np.dtype("<u4"),
}
"""Accepted safetensors dtypes and their numpy equivalents (little-endian)."""
_NUMPY_TO_ST: Final = {dt: name for name, dt in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds on what a decoder accepts.

    Attributes:
        max_bytes: largest payload; tensor data allocated by decoding is below it.
        max_header_bytes: largest JSON header.
        max_tensors: most tensors in one payload.
        max_ndim: most dimensions per tensor.
        max_envelope_bytes: largest JSON envelope.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_tensors: int = 4096
    max_ndim: int = 8
    max_envelope_bytes: int = 64 * 1024


DEFAULT_LIMITS: Final = DecodeLimits()


@dataclass(frozen=True, slots=True)
class Decoded(Generic[E]):
    """A decoded payload: its tensors (read-only views are not shared) and envelope."""

    tensors: dict[str, np.ndarray]
    envelope: E
    nbytes: int = field(default=0)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as declared by a header, checked against the limits."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def encode(tensors: Mapping[str, np.ndarray], envelope: BaseModel) -> bytes:
    """Encode named arrays and an envelope to safetensors bytes.

    Arrays are written little-endian and C-contiguous; only the dtypes in
    :data:`DTYPES` are accepted.

    Raises:
        EncodeError: unsupported dtype, bad tensor name or object arrays.
    """
    prepared: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__" or len(name) > 512:
            raise EncodeError("bad_name", f"tensor name {name!r}")
        arr = np.asarray(array)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype not in _NUMPY_TO_ST:
            raise EncodeError("bad_dtype", f"{name}: dtype {arr.dtype} not in {list(DTYPES)}")
        prepared[name] = np.asarray(arr, dtype=dtype, order="C")
    metadata = {
        ENVELOPE_KEY: envelope.model_dump_json(),
        ENVELOPE_TYPE_KEY: type(envelope).__name__,
    }
    return bytes(st_save(prepared, metadata=metadata))


def read_header(data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS,
                ) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header without touching tensor data.

    Returns:
        The declared tensors (sorted by offset) and the ``__metadata__`` strings.

    Raises:
        DecodeError: for any malformed or over-limit header.
    """
    size = len(data)
    if size > limits.max_bytes:
        raise DecodeError("too_large", f"{size} bytes > limit {limits.max_bytes}")
    if size < 8:
        raise DecodeError("truncated", f"{size} bytes, no header length")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > limits.max_header_bytes:
        raise DecodeError("bad_header", f"header of {header_len} bytes > {limits.max_header_bytes}")
    if header_len > size - 8:
        raise DecodeError("truncated", f"header of {header_len} bytes but only {size - 8} follow")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers beyond Python's 4300-digit limit.
        raise DecodeError("bad_header", f"header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise DecodeError("bad_header", "header is not a JSON object")
    raw_meta = header.pop("__metadata__", {})
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise DecodeError("bad_header", "__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise DecodeError("bad_header", f"{len(header)} tensors > limit {limits.max_tensors}")
    data_len = size - 8 - header_len
    infos = sorted(
        (_tensor_info(name, spec, limits) for name, spec in header.items()),
        key=lambda t: (t.begin, t.end),
    )
    position = 0
    for info in infos:
        if info.begin != position:
            raise DecodeError("bad_header", f"{info.name}: data does not start at byte {position}")
        position = info.end
    if position != data_len:
        raise DecodeError("bad_header", f"tensors cover {position} bytes, payload has {data_len}")
    return infos, raw_meta


_INT64_MAX = 2**63 - 1


def _short(value: object) -> str:
    """A bounded repr for error details (huge integers cannot even be printed)."""
    try:
        text = repr(value)
    except ValueError:
        return "<a number too large to print>"
    return text if len(text) <= 200 else text[:200] + "..."


def _tensor_info(name: str, spec: object, limits: DecodeLimits) -> TensorInfo:
    if not isinstance(spec, dict):
        raise DecodeError("bad_header", f"{name!r}: tensor spec is not an object")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DecodeError("bad_dtype", f"{name!r}: dtype {dtype!r} not in {list(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(type(d) is int and 0 <= d <= _INT64_MAX for d in shape)
    ):
        raise DecodeError("bad_shape", f"{name!r}: shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o <= _INT64_MAX for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise DecodeError("bad_header", f"{name!r}: data_offsets {_short(offsets)}")
    # Python ints do not overflow, so a huge declared shape is caught here, not allocated.
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise DecodeError(
            "bad_shape", f"{name!r}: shape {shape} x {dtype} = {nbytes} bytes, "
            f"offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def decode(
    data: bytes | bytearray | memoryview,
    envelope_type: type[E],
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Decoded[E]:
    """Decode safetensors bytes into arrays and a validated envelope.

    Raises:
        DecodeError: malformed, over-limit, wrong envelope type or invalid envelope.
    """
    infos, metadata = read_header(data, limits)
    envelope_json = metadata.get(ENVELOPE_KEY)
    if envelope_json is None:
        raise DecodeError("no_envelope", "no envelope in __metadata__")
    declared = metadata.get(ENVELOPE_TYPE_KEY)
    if declared is not None and declared != envelope_type.__name__:
        raise DecodeError(
            "wrong_envelope", f"envelope is {declared}, expected {envelope_type.__name__}"
        )
    try:
        envelope = decode_message(envelope_type, envelope_json, max_bytes=limits.max_envelope_bytes)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"envelope: {exc.detail}") from None
    try:
        tensors = st_load(bytes(data))
    except SafetensorError as exc:  # defence in depth: our header check should catch it first
        raise DecodeError("bad_payload", str(exc)) from None
    for info in infos:
        array = tensors[info.name]
        if array.shape != info.shape or array.dtype != DTYPES[info.dtype]:
            raise DecodeError("bad_payload", f"{info.name}: decoded as {array.dtype}{array.shape}")
    return Decoded(tensors=tensors, envelope=envelope, nbytes=sum(i.end - i.begin for i in infos))
