"""SCAFFOLD: control variates correct client drift on non-IID data.

Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning",
Algorithm 1 with option II. The server keeps a control variate ``c`` (one array per
shared parameter) and sends it with the global weights (tensors named ``cv:{name}``).
Each device keeps
its own ``c_i`` (zero at first, persisted in its state folder), trains with every
step's gradient corrected by ``c - c_i``, then sets

    c_i+ = c_i - c + (x - y_i) / (K * lr)          (K local steps, lr its learning rate)

and sends ``delta_y = y_i - x`` and ``delta_c = c_i+ - c_i`` (``cv:{name}`` tensors of
the same update). The server, over the round's set ``S`` of ``N`` eligible devices:

    x <- x + server_lr * mean_i delta_y_i ;   c <- c + |S| / N * mean_i delta_c_i

Means are unweighted, as in the paper. ``c`` is strategy state: persisted next to
the global weights, so a restarted coordinator continues with it. Option II assumes
plain SGD; with momentum the correction is approximate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from cloud.fl.errors import IncompatibleUpdateError
from cloud.fl.strategy import FLOAT32, ParamValue, Strategy, Weights, param_float
from schemas.fl import CONTROL_PREFIX, split_control

logger = logging.getLogger(__name__)

class Scaffold(Strategy):
    """SCAFFOLD's server: the mean delta, and the control variate it broadcasts."""

    name: ClassVar[str] = "scaffold"
    dp_compatible: ClassVar[bool] = False

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = param_float(self.name, "server_lr", server_lr, gt=0.0, le=100.0)
        self.control: Weights = {}
        self.population = 0
        self._dy: dict[str, np.ndarray] = {}
        self._dc: dict[str, np.ndarray] = {}

    def config(self) -> dict[str, ParamValue]:
        """``server_lr``."""
        return {"server_lr": self.server_lr}

    def configure_population(self, eligible: int) -> None:
        """N: the devices eligible this round (``c`` moves by ``|S| / N``)."""
        self.population = eligible

    def broadcast_arrays(self, weights: Mapping[str, np.ndarray]) -> Weights:
        """``c`` for the shared ``weights`` (zeros where it was never set)."""
        return {k: self.control.get(k, np.zeros(np.shape(v), FLOAT32))
                for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """``c`` (persisted next to the global weights)."""
        return dict(self.control)

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore ``c``."""
        self.control = {k: np.asarray(v, FLOAT32) for k, v in arrays.items()}

    def _on_begin(self) -> None:
        self._dy = {n: np.zeros(self.global_weights[n].shape, np.float64) for n in self.shared}
        self._dc = {n: np.zeros(self.global_weights[n].shape, np.float64) for n in self.shared}

    def _on_end(self) -> None:
        self._dy, self._dc = {}, {}

    def _check(self, delta: Mapping[str, np.ndarray]) -> None:
        plain, control = split_control(delta)
        super()._check(plain)
        for name in self.shared:
            array = control.get(name)
            if array is None:
                raise IncompatibleUpdateError("missing_tensor",
                                              f"control variate {name!r} is missing")
            if not isinstance(array, np.ndarray) or array.dtype != FLOAT32 \
                    or array.shape != self.global_weights[name].shape:
                raise IncompatibleUpdateError("shape_mismatch",
                                              f"control variate {name!r} does not fit")
            if not np.all(np.isfinite(array)):
                raise IncompatibleUpdateError("non_finite",
                                              f"control variate {name!r} is not finite")

    def _accumulate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        plain, control = split_control(delta)
        for name in self.shared:
            self._dy[name] += plain[name]
            self._dc[name] += control[name]

    def _aggregate(self) -> Weights:
        n = self.count
        share = n / max(self.population, n)
        new: Weights = {}
        for name in self.shared:
            new[name] = (self.global_weights[name] + self.server_lr * self._dy[name] / n
                         ).astype(FLOAT32)
            old = self.control.get(name, np.zeros(self._dc[name].shape, FLOAT32))
            self.control[name] = (old + share * self._dc[name] / n).astype(FLOAT32)
        logger.debug("scaffold: %d updates of %d eligible", n, self.population)
        return new
