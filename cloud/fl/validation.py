"""Checks on a received update before it reaches a strategy.

Pure functions: :func:`validate_update` compares a decompressed delta with the
round's global model and returns ``None`` when it is acceptable, or an
:class:`UpdateRejection` whose :class:`RejectReason` is the counter name and the
``reason`` of the :class:`schemas.fl.Rejection` reported in the task status.

Checks, in order: every expected name present (``missing_tensor``), no name
outside the model (``extra_tensor``), same shape (``shape_mismatch``), float32
(``dtype_mismatch``), every value finite (``non_finite``), L2 norm over all the
checked tensors within the bound (``norm_bound``).

The finiteness and norm checks share one pass: a float32 dot product per tensor
(no model-sized temporary); only when a sum of squares is not finite is the
tensor scanned again to tell NaN/infinity from overflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from schemas.fl import Rejection

logger = logging.getLogger(__name__)

_DETAIL_MAX = 1024


class RejectReason(StrEnum):
    """Why an update was refused."""

    MISSING_TENSOR = "missing_tensor"
    EXTRA_TENSOR = "extra_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"


@dataclass(frozen=True, slots=True)
class UpdateRejection:
    """A refused update: the reason code and a human-readable detail."""

    reason: RejectReason
    detail: str

    def to_wire(self, device_id: str) -> Rejection:
        """The :class:`schemas.fl.Rejection` reported in the task status."""
        return Rejection(device_id=device_id, reason=self.reason.value,
                         detail=self.detail[:_DETAIL_MAX])


def squared_norm(array: np.ndarray) -> float:
    """``sum(x^2)`` of a float array, as a float (inf on overflow, nan with NaN)."""
    flat = np.ravel(array)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(flat, flat))


def validate_update(
    delta: Mapping[str, object],
    global_weights: Mapping[str, np.ndarray],
    *,
    names: Collection[str] | None = None,
    max_norm: float | None = None,
) -> UpdateRejection | None:
    """Check a delta against the global model.

    Args:
        delta: the decompressed update (name -> array).
        global_weights: the round's global model; a delta may only name its
            parameters, with their shapes and dtypes.
        names: the names the delta must carry (``Strategy.shared_names``); default
            all of ``global_weights``. Other names of the model are tolerated and
            not checked further.
        max_norm: largest L2 norm of the delta over ``names``; ``None``: no bound.

    Returns:
        ``None`` if the update is acceptable, else why not.
    """
    required = list(global_weights) if names is None else list(names)
    missing = [name for name in required if name not in delta]
    if missing:
        return _reject(RejectReason.MISSING_TENSOR, f"missing {_some(missing)}")
    extra = [name for name in delta if name not in global_weights]
    if extra:
        return _reject(RejectReason.EXTRA_TENSOR, f"not in the model: {_some(extra)}")
    checked: list[tuple[str, np.ndarray]] = []
    for name in required:
        array = _check_layout(name, delta[name], global_weights[name])
        if isinstance(array, UpdateRejection):
            return array
        checked.append((name, array))
    return _check_values(checked, max_norm)


def _check_layout(name: str, array: object, expected: np.ndarray,
                  ) -> np.ndarray | UpdateRejection:
    """The array if its type, shape and dtype match ``expected``, else the rejection."""
    if not isinstance(array, np.ndarray):
        return _reject(RejectReason.DTYPE_MISMATCH, f"{name}: {type(array).__name__}")
    if array.shape != expected.shape:
        return _reject(RejectReason.SHAPE_MISMATCH,
                       f"{name}: shape {array.shape}, expected {expected.shape}")
    if array.dtype != expected.dtype:
        return _reject(RejectReason.DTYPE_MISMATCH,
                       f"{name}: dtype {array.dtype}, expected {expected.dtype}")
    return array


def _check_values(checked: list[tuple[str, np.ndarray]], max_norm: float | None,
                  ) -> UpdateRejection | None:
    total = 0.0
    for name, array in checked:
        squares = squared_norm(array)
        if not math.isfinite(squares):
            if not np.isfinite(array).all():
                return _reject(RejectReason.NON_FINITE, f"{name}: NaN or infinity")
            squares = math.inf  # finite values whose squares overflow float32
        total += squares
    if max_norm is not None and not math.sqrt(total) <= max_norm:
        return _reject(RejectReason.NORM_BOUND, f"L2 norm {math.sqrt(total):.6g} > {max_norm:g}")
    return None


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _reject(reason: RejectReason, detail: str) -> UpdateRejection:
    logger.debug("update rejected: %s: %s", reason, detail)
    return UpdateRejection(reason, detail)
