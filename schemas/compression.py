"""Compression of federated-learning update deltas: fp16, int8 and top-k int8.

A device encodes its delta (``client weights - global weights``, float32) with
:func:`compress` and sends :attr:`Compressed.tensors` in the safetensors payload
of its update; the cloud restores float32 deltas with :func:`decompress`.

Wire layout of one parameter ``w`` (``::`` separates a parameter name from the
part's suffix; the last ``::`` counts, so parameter names may contain ``::``):

======================  ===========================================================
kind                    tensors
======================  ===========================================================
``none``                ``w`` float32, the delta as is
``fp16``                ``w`` float16
``int8``                ``w::q`` int8 (shape of ``w``), ``w::scale`` float32 ``[1]``
``topk_int8``           ``w::idx`` int32 ``[k]`` flat indices, strictly increasing;
                        ``w::val`` int8 ``[k]``; ``w::scale`` float32 ``[1]``;
                        ``w::shape`` int32 ``[ndim]``
======================  ===========================================================

Quantization is symmetric per tensor: ``scale = max|x| / 127`` and
``q = round(x / scale)``, so each coordinate is restored within ``scale / 2``.
Top-k keeps, per tensor, the ``ceil(topk_fraction * size)`` coordinates of
largest magnitude (at least one) and quantizes them with the same scheme.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression
drops is not lost but carried over. The device passes the previous round's
:attr:`Compressed.residual` back in; ``delta + residual`` is compressed and the
new residual is ``delta + residual - decompress(sent)``. Over many rounds the
sum of what was sent then tracks the sum of the true deltas, off by one bounded
residual.

:func:`decompress` reads untrusted tensors: every name, dtype, shape, scale and
index is checked before anything is allocated, and malformed input raises
:class:`CompressionError`, never a bare ``IndexError`` or ``ValueError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from schemas.errors import SchemaError
from schemas.fl import Compression

logger = logging.getLogger(__name__)

SEP: Final = "::"
"""Separates a parameter name from the suffix of one of its encoded parts."""
Q: Final = "q"
SCALE: Final = "scale"
IDX: Final = "idx"
VAL: Final = "val"
SHAPE: Final = "shape"
PARTS: Final[dict[Compression, frozenset[str]]] = {
    Compression.INT8: frozenset({Q, SCALE}),
    Compression.TOPK_INT8: frozenset({IDX, VAL, SCALE, SHAPE}),
}
"""Suffixes of the parts each suffixed kind sends per parameter."""

INT8_MAX: Final = 127
FP16_MAX: Final = float(np.finfo(np.float16).max)
MAX_NDIM: Final = 8
DEFAULT_MAX_ELEMENTS: Final = 1 << 27
"""Most float32 elements :func:`decompress` produces in total (512 MiB) unless told.

A top-k payload of a few bytes can declare a huge shape; the cloud should pass
the size of its global model instead.
"""

_F32: Final = np.dtype(np.float32)
_F16: Final = np.dtype(np.float16)
_I8: Final = np.dtype(np.int8)
_I32: Final = np.dtype(np.int32)
_I32_MAX: Final = int(np.iinfo(np.int32).max)


class CompressionError(SchemaError):
    """An update cannot be compressed, or a compressed payload is malformed.

    Attributes:
        reason: short code for counters, e.g. ``bad_name``, ``bad_dtype``,
            ``bad_shape``, ``bad_scale``, ``bad_index``, ``missing_part``,
            ``unexpected_tensor``, ``too_large``, ``non_finite``, ``fp16_overflow``,
            ``bad_fraction``, ``bad_residual``.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"compression: {reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Compressed:
    """A compressed delta and the error-feedback residual to keep for next round.

    Attributes:
        tensors: what goes in the safetensors payload, named as in the module docs.
        residual: ``delta + previous residual - decompress(tensors)``, float32, one
            array per parameter (zeros for ``none``). Pass it as ``residual`` to the
            next :func:`compress` of the same model.
    """

    tensors: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data on the wire (see :func:`wire_bytes`)."""
        return wire_bytes(self.tensors)


def wire_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data in a payload; the safetensors header adds a little JSON."""
    return sum(int(np.asarray(t).nbytes) for t in tensors.values())


def topk_count(size: int, fraction: float) -> int:
    """Coordinates kept by top-k of a tensor of ``size`` elements: at least one if any."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(fraction * size)))


# ---------------------------------------------------------------- compression


def compress(
    delta: Mapping[str, np.ndarray],
    kind: Compression,
    *,
    topk_fraction: float | None = None,
    residual: Mapping[str, np.ndarray] | None = None,
) -> Compressed:
    """Encode a float32 delta for the wire, with error feedback.

    Args:
        delta: parameter name -> delta (any float dtype; cast to float32).
        kind: the encoding.
        topk_fraction: share of coordinates kept per tensor, in (0, 1]; needed by
            ``topk_int8`` and ignored by the other kinds.
        residual: the previous round's :attr:`Compressed.residual`, added to the
            delta before compressing; ``None`` on the first round.

    Returns:
        The tensors to send and the new residual.

    Raises:
        CompressionError: bad name, non-float or non-finite delta (lossy kinds),
            fp16 overflow, a residual that does not match the delta, a bad
            ``topk_fraction`` or a tensor too large for int32 indices.
    """
    kind = Compression(kind)
    fraction = _check_fraction(topk_fraction) if kind is Compression.TOPK_INT8 else 1.0
    if residual is not None and set(residual) - set(delta):
        extra = sorted(set(residual) - set(delta))
        raise CompressionError("bad_residual", f"residual has parameters not in delta: {extra}")
    tensors: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        if not isinstance(name, str) or not name:
            raise CompressionError("bad_name", f"parameter name {name!r}")
        corrected = _corrected(name, value, residual)
        if kind is Compression.NONE:
            tensors[name] = corrected
            new_residual[name] = np.zeros_like(corrected)
            continue
        if not np.isfinite(corrected).all():
            raise CompressionError("non_finite", f"{name}: delta has NaN or infinity")
        if kind is Compression.FP16:
            tensors[name], new_residual[name] = _fp16(name, corrected)
        elif kind is Compression.INT8:
            parts, new_residual[name] = _int8(corrected)
            tensors.update({f"{name}{SEP}{suffix}": part for suffix, part in parts.items()})
        else:
            parts, new_residual[name] = _topk_int8(name, corrected, fraction)
            tensors.update({f"{name}{SEP}{suffix}": part for suffix, part in parts.items()})
    logger.debug("compressed %d tensors as %s: %d bytes", len(delta), kind, wire_bytes(tensors))
    return Compressed(tensors=tensors, residual=new_residual)


def _check_fraction(fraction: float | None) -> float:
    if (
        fraction is None
        or isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0.0 < fraction <= 1.0
    ):
        raise CompressionError("bad_fraction", f"topk_fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def _corrected(name: str, value: np.ndarray, residual: Mapping[str, np.ndarray] | None,
               ) -> np.ndarray:
    """``delta + residual`` as a new float32 array (the caller's arrays stay untouched)."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise CompressionError("bad_dtype", f"{name}: delta dtype {array.dtype} is not float")
    corrected = np.array(array, dtype=np.float32, order="C", copy=True)
    if residual is None:
        return corrected
    previous = residual.get(name)
    if previous is None:
        raise CompressionError("bad_residual", f"{name}: no residual for this parameter")
    previous = np.asarray(previous)
    if previous.shape != corrected.shape:
        raise CompressionError(
            "bad_residual", f"{name}: residual shape {previous.shape} != {corrected.shape}"
        )
    np.add(corrected, previous, out=corrected, casting="unsafe")
    return corrected


def _fp16(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size and float(np.abs(x).max()) > FP16_MAX:
        raise CompressionError("fp16_overflow", f"{name}: |value| > {FP16_MAX}")
    half = x.astype(np.float16)
    residual = x.copy()
    residual -= half
    return half, residual


def _scale_of(max_abs: float) -> np.float32:
    return np.float32(max_abs / INT8_MAX)


def _quantize(x: np.ndarray, scale: np.float32) -> np.ndarray:
    """Round ``x / scale`` to the nearest int8 in [-127, 127] (zeros if scale is 0)."""
    if scale == 0.0:
        return np.zeros(x.shape, dtype=np.int8)
    q = x.astype(np.float64)  # an array even when x is 0-d (ufuncs return scalars then)
    q /= np.float64(scale)
    np.rint(q, out=q)
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return q.astype(np.int8)


def _int8(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    scale = _scale_of(float(np.abs(x).max())) if x.size else np.float32(0.0)
    q = _quantize(x, scale)
    residual = x.copy()
    residual -= q.astype(np.float32) * scale
    return {Q: q, SCALE: np.array([scale], dtype=np.float32)}, residual


def _topk_int8(name: str, x: np.ndarray, fraction: float,
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    size = x.size
    if size > _I32_MAX:
        raise CompressionError("too_large", f"{name}: {size} elements exceed int32 indices")
    flat = x.reshape(-1)
    k = topk_count(size, fraction)
    magnitude = np.abs(flat)
    if k == size:
        idx = np.arange(size, dtype=np.int64)
    else:
        idx = np.argpartition(magnitude, size - k)[size - k :]
        idx.sort()
    kept = flat[idx]
    scale = _scale_of(float(magnitude[idx].max())) if k else np.float32(0.0)
    val = _quantize(kept, scale)
    residual = flat.copy()
    residual[idx] -= val.astype(np.float32) * scale
    parts = {
        IDX: idx.astype(np.int32),
        VAL: val,
        SCALE: np.array([scale], dtype=np.float32),
        SHAPE: np.array(x.shape, dtype=np.int32),
    }
    return parts, residual.reshape(x.shape)


# -------------------------------------------------------------- decompression


def decompress(
    tensors: Mapping[str, np.ndarray],
    kind: Compression,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, np.ndarray]:
    """Restore float32 deltas from the tensors of a received update.

    Args:
        tensors: the payload's tensors, as decoded by :func:`schemas.codec.decode`.
        kind: the encoding announced by the update's envelope.
        max_elements: most float32 elements produced in total; the cloud passes the
            size of its global model.

    Returns:
        Parameter name -> float32 delta. For ``none`` the arrays are the ones given
        (not copied); every other kind returns new arrays.

    Raises:
        CompressionError: a name, dtype, shape, scale or index is malformed, a part
            is missing or unexpected, or the output would exceed ``max_elements``.
    """
    try:
        kind = Compression(kind)
    except ValueError:
        raise CompressionError("bad_kind", f"unknown compression {kind!r}") from None
    if not isinstance(tensors, Mapping):
        raise CompressionError("bad_payload", f"tensors must be a mapping, got {type(tensors)}")
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise CompressionError("bad_name", f"tensor name {name!r}")
        if not isinstance(array, np.ndarray):
            raise CompressionError("bad_payload", f"{name}: {type(array).__name__} is not an array")
        if array.ndim > MAX_NDIM:
            raise CompressionError("bad_shape", f"{name}: {array.ndim} dimensions > {MAX_NDIM}")
    budget = _Budget(max_elements)
    if kind is Compression.NONE:
        for name, array in tensors.items():
            _expect_dtype(name, array, _F32)
            budget.take(name, array.size)
        return dict(tensors)
    if kind is Compression.FP16:
        out: dict[str, np.ndarray] = {}
        for name, array in tensors.items():
            _expect_dtype(name, array, _F16)
            budget.take(name, array.size)
            out[name] = array.astype(np.float32)
        return out
    groups = _group(tensors, PARTS[kind])
    if kind is Compression.INT8:
        return {name: _int8_restore(name, parts, budget) for name, parts in groups.items()}
    return {name: _topk_restore(name, parts, budget) for name, parts in groups.items()}


class _Budget:
    """Counts the float32 elements decompression is about to allocate."""

    __slots__ = ("left",)

    def __init__(self, max_elements: int) -> None:
        self.left = max_elements

    def take(self, name: str, elements: int) -> None:
        if elements > self.left:
            raise CompressionError(
                "too_large", f"{name}: {elements} elements, only {max(self.left, 0)} allowed"
            )
        self.left -= elements


def _group(tensors: Mapping[str, np.ndarray], wanted: frozenset[str],
           ) -> dict[str, dict[str, np.ndarray]]:
    """Group ``base::suffix`` tensors by base, checking each base has exactly ``wanted``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        base, sep, suffix = name.rpartition(SEP)
        if not sep or not base or suffix not in wanted:
            raise CompressionError(
                "unexpected_tensor", f"{name!r} is not <name>{SEP}<{'|'.join(sorted(wanted))}>"
            )
        groups.setdefault(base, {})[suffix] = array
    for base, parts in groups.items():
        missing = wanted - parts.keys()
        if missing:
            raise CompressionError("missing_part", f"{base}: missing {sorted(missing)}")
    return groups


def _expect_dtype(name: str, array: np.ndarray, dtype: np.dtype[np.generic]) -> None:
    if array.dtype != dtype:
        raise CompressionError("bad_dtype", f"{name}: dtype {array.dtype}, expected {dtype}")


def _read_scale(name: str, array: np.ndarray) -> np.float32:
    _expect_dtype(f"{name}{SEP}{SCALE}", array, _F32)
    if array.shape != (1,):
        raise CompressionError("bad_shape", f"{name}{SEP}{SCALE}: shape {array.shape} != (1,)")
    scale = array[0]
    if not (np.isfinite(scale) and scale >= 0.0):
        raise CompressionError("bad_scale", f"{name}: scale {float(scale)!r}")
    return np.float32(scale)


def _int8_restore(name: str, parts: dict[str, np.ndarray], budget: _Budget) -> np.ndarray:
    q = parts[Q]
    _expect_dtype(f"{name}{SEP}{Q}", q, _I8)
    scale = _read_scale(name, parts[SCALE])
    budget.take(name, q.size)
    out = q.astype(np.float32)
    out *= scale
    return out


def _topk_restore(name: str, parts: dict[str, np.ndarray], budget: _Budget) -> np.ndarray:
    shape_part, idx, val = parts[SHAPE], parts[IDX], parts[VAL]
    _expect_dtype(f"{name}{SEP}{SHAPE}", shape_part, _I32)
    _expect_dtype(f"{name}{SEP}{IDX}", idx, _I32)
    _expect_dtype(f"{name}{SEP}{VAL}", val, _I8)
    if shape_part.ndim != 1 or shape_part.size > MAX_NDIM or (shape_part < 0).any():
        raise CompressionError("bad_shape", f"{name}: declared shape {shape_part.tolist()}")
    shape = tuple(int(d) for d in shape_part)
    size = math.prod(shape)  # Python ints: a huge declared shape is refused, not allocated
    if idx.ndim != 1 or val.ndim != 1 or idx.size != val.size or idx.size > size:
        raise CompressionError(
            "bad_shape", f"{name}: idx {idx.shape} and val {val.shape} for {size} elements"
        )
    if idx.size and (
        int(idx[0]) < 0 or int(idx[-1]) >= size or (idx[1:] <= idx[:-1]).any()
    ):
        raise CompressionError(
            "bad_index", f"{name}: indices must increase strictly within [0, {size})"
        )
    scale = _read_scale(name, parts[SCALE])
    budget.take(name, size)
    out = np.zeros(size, dtype=np.float32)
    out[idx] = val.astype(np.float32) * scale
    return out.reshape(shape)
