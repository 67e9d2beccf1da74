"""The streaming aggregation interface every strategy implements.

The cloud opens a round with the global weights, adds each client's update as it
arrives over MQTT (after :func:`cloud.fl.validation.validate_update` accepted
it), then asks for the new global weights::

    strategy.begin_round(global_weights)          # name -> float32 array
    for delta, num_examples in arriving_updates:  # delta = client - global
        strategy.add(delta, num_examples)
    new_global = strategy.finalize()

Strategies of the averaging family (``buffers = False``) fold each update into a
running sum and hold O(model size) memory whatever the number of clients; the
robust ones (``buffers = True``) keep every update until :meth:`Strategy.finalize`.
A strategy may keep state across rounds (server optimizers keep their moments).

The strategy holds references to the global arrays during the round: the caller
must not modify them in place until :meth:`Strategy.finalize` returned.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Final

import numpy as np

from cloud.fl.errors import (
    IncompatibleUpdateError,
    NoUpdatesError,
    RoundStateError,
    StrategyConfigError,
)

logger = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
"""Named float32 arrays: global weights, or a delta (client weights - global weights)."""
ParamValue = float | int | str | list[str] | None
"""What a strategy's configuration holds (as read from a task's YAML/TOML)."""

FLOAT32: Final = np.dtype(np.float32)


class Strategy(ABC):
    """A federated aggregation strategy fed one client update at a time.

    Attributes:
        name: the registry name (``fedavg``, ``krum``, ...), also sent in round plans.
        buffers: True when the strategy keeps every update of a round in memory
            (robust statistics need them all); False when memory is O(model size).
    """

    name: ClassVar[str]
    buffers: ClassVar[bool] = False
    dp_compatible: ClassVar[bool] = True
    """Whether the noisy mean of differential privacy can stand for its updates."""

    def __init__(self) -> None:
        self._global: Weights = {}
        self._shared: list[str] = []
        self._count = 0
        self._open = False
        self.local_steps: int | None = None
        """The local steps of the update being added (for :meth:`_accumulate`)."""

    # ----------------------------------------------------------- public API

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Start a round from the current global weights (float32 arrays).

        Raises:
            IncompatibleUpdateError: a global array is not a float32 ndarray.
            RoundStateError: the strategy's state does not fit this model.
        """
        for name, array in global_weights.items():
            if not isinstance(array, np.ndarray) or array.dtype != FLOAT32:
                what = getattr(array, "dtype", type(array).__name__)
                raise IncompatibleUpdateError(
                    "dtype_mismatch", f"global {name!r} is {what}, expected float32"
                )
        self._global = dict(global_weights)
        self._shared = self.shared_names(self._global)
        self._count = 0
        self._on_begin()
        self._open = True

    def add(self, delta: Mapping[str, np.ndarray], weight: float, *,
            local_steps: int | None = None) -> None:
        """Fold in one client's delta (client weights - global weights).

        Args:
            delta: float32 arrays for every shared name; names of the global model
                that are not shared (FedBN's batch-norm) are ignored if present.
            weight: the client's number of examples, > 0.
            local_steps: the local SGD steps the client took (FedNova needs them).

        Raises:
            RoundStateError: no round is open.
            IncompatibleUpdateError: a name, shape or dtype does not match the global
                model, or the weight is not a finite positive number.
        """
        if not self._open:
            raise RoundStateError(f"{self.name}: add() outside a round")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float | np.integer | np.floating)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise IncompatibleUpdateError("bad_weight", f"weight {weight!r} is not finite and > 0")
        self._check(delta)
        self.local_steps = local_steps
        self._accumulate(delta, float(weight))
        self._count += 1

    def finalize(self) -> Weights:
        """Close the round and return the new global weights (float32).

        Names that are not shared (FedBN) keep the global arrays given to
        :meth:`begin_round` (the same objects).

        Raises:
            RoundStateError: no round is open.
            NoUpdatesError: nothing was added.
        """
        if not self._open:
            raise RoundStateError(f"{self.name}: finalize() outside a round")
        if self._count == 0:
            raise NoUpdatesError(self.name)
        updated = self._aggregate()
        result = {name: updated.get(name, array) for name, array in self._global.items()}
        logger.info("%s: aggregated %d updates", self.name, self._count)
        self._open = False
        self._on_end()
        self._global = {}
        return result

    @property
    def count(self) -> int:
        """Updates added in the current round."""
        return self._count

    def shared_names(self, names: Iterable[str]) -> list[str]:
        """The parameter names averaged and sent to clients (all, unless overridden)."""
        return list(names)

    def config(self) -> dict[str, ParamValue]:
        """The parameters this strategy was made with (``make_strategy`` accepts them)."""
        return {}

    def client_config(self) -> dict[str, float]:
        """Hyper-parameters the round plan must send to clients (e.g. ``proximal_mu``)."""
        return {}

    def configure_population(self, eligible: int) -> None:  # noqa: B027 - optional hook
        """The number of devices eligible in the round about to begin (SCAFFOLD)."""

    def configure_training(self, momentum: float) -> None:  # noqa: B027 - optional hook
        """The devices' SGD momentum in the round about to begin (FedNova)."""

    def broadcast_arrays(self, weights: Mapping[str, np.ndarray]) -> Weights:
        """Arrays sent to the devices with the global ``weights`` (names prefixed ``cv:``)."""
        return {}

    # ------------------------------------------------------ for subclasses

    @property
    def global_weights(self) -> Weights:
        """The global weights of the open round."""
        return self._global

    @property
    def shared(self) -> list[str]:
        """The shared names of the open round, in the global model's order."""
        return self._shared

    def state_arrays(self) -> dict[str, np.ndarray]:
        """State carried from round to round (server optimizers); empty if stateless.

        It is persisted next to the global weights, so a restart continues the
        optimizer exactly where it was.
        """
        return {}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:  # noqa: B027
        """Restore what :meth:`state_arrays` returned (after a restart)."""

    def _on_begin(self) -> None:  # noqa: B027 - an optional hook
        """Prepare buffers for a round; ``global_weights`` and ``shared`` are set."""

    def _on_end(self) -> None:  # noqa: B027 - an optional hook
        """Release the round's buffers after :meth:`finalize`."""

    @abstractmethod
    def _accumulate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in a checked delta."""

    @abstractmethod
    def _aggregate(self) -> Weights:
        """New global float32 weights for the shared names."""

    def _check(self, delta: Mapping[str, np.ndarray]) -> None:
        for name in self._shared:
            array = delta.get(name)
            if array is None:
                raise IncompatibleUpdateError("missing_tensor", f"{name!r} is missing")
            if not isinstance(array, np.ndarray) or array.dtype != FLOAT32:
                what = getattr(array, "dtype", type(array).__name__)
                raise IncompatibleUpdateError("dtype_mismatch", f"{name!r} is {what}")
            expected = self._global[name].shape
            if array.shape != expected:
                raise IncompatibleUpdateError(
                    "shape_mismatch", f"{name!r} has shape {array.shape}, expected {expected}"
                )
        if len(delta) > len(self._shared):
            extra = sorted(n for n in delta if n not in self._global)
            if extra:
                raise IncompatibleUpdateError("extra_tensor", f"not in the model: {extra[:5]}")


# ---------------------------------------------------------- parameter checks


def param_float(
    strategy: str,
    key: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> float:
    """A finite real parameter within bounds, or :class:`StrategyConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StrategyConfigError(strategy, f"{key} must be a finite number, got {value!r}")
    number = float(value)
    if (
        (ge is not None and number < ge)
        or (gt is not None and number <= gt)
        or (le is not None and number > le)
        or (lt is not None and number >= lt)
    ):
        bounds = ", ".join(
            f"{op} {bound}"
            for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
            if bound is not None
        )
        raise StrategyConfigError(strategy, f"{key} must be {bounds}, got {value!r}")
    return number


def param_int(strategy: str, key: str, value: object, *, ge: int = 0) -> int:
    """An integer parameter ``>= ge``, or :class:`StrategyConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < ge:
        raise StrategyConfigError(strategy, f"{key} must be an integer >= {ge}, got {value!r}")
    return value


def param_names(strategy: str, key: str, value: object) -> list[str]:
    """A list of non-empty strings, or :class:`StrategyConfigError`."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise StrategyConfigError(strategy, f"{key} must be a list of names, got {value!r}")
    return [str(v) for v in value]
