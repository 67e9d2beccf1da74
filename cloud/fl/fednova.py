"""FedNova: normalized averaging of the devices' deltas by their local work.

Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization". Chosen as the second drift-correcting strategy (beside
SCAFFOLD) for fleets whose devices do different amounts of local work: a device
with more data, more epochs or a faster processor takes more local steps, and FedAvg
then pulls the global model towards its local optimum (objective inconsistency).
FedNova divides each device's
delta by its normalizer ``a_i`` (the number of local steps ``tau_i`` for plain SGD;
with momentum ``rho``, ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``)
and rescales the mean by the effective number of steps:

    x <- x + tau_eff * sum_i p_i delta_i / a_i,   tau_eff = sum_i p_i a_i,   p_i = n_i / n

It needs no state on the devices and one integer on the wire (``local_steps`` in the
update envelope), so it works with compression and with devices that come and go.
FedDyn was the alternative; it keeps a per-device gradient state that a device that
misses rounds, or restarts, must carry correctly, which intermittent fleets make hard.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from cloud.fl.errors import IncompatibleUpdateError
from cloud.fl.strategy import FLOAT32, Strategy, Weights
from fl_tasks.base import momentum_steps

logger = logging.getLogger(__name__)


def normalizer(steps: int, momentum: float) -> float:
    """``a_i``: the L1 norm of the device's SGD step weights (Wang et al., eq. 7)."""
    return momentum_steps(steps, momentum)


class FedNova(Strategy):
    """Normalized averaging of the devices' deltas by their local work."""

    name: ClassVar[str] = "fednova"

    def __init__(self) -> None:
        super().__init__()
        self.momentum = 0.0
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self._tau_eff = 0.0

    def configure_training(self, momentum: float) -> None:
        """The devices' SGD momentum this round (it sets the normalizers)."""
        self.momentum = momentum

    def _on_begin(self) -> None:
        self._sum = {n: np.zeros(self.global_weights[n].shape, np.float64) for n in self.shared}
        self._weight = 0.0
        self._tau_eff = 0.0

    def _on_end(self) -> None:
        self._sum = {}

    def _accumulate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        steps = self.local_steps
        if steps is None or steps < 1:
            raise IncompatibleUpdateError("missing_local_steps",
                                          "fednova needs the update's local_steps")
        a = normalizer(steps, self.momentum)
        for name in self.shared:
            self._sum[name] += weight / a * delta[name].astype(np.float64)
        self._weight += weight
        self._tau_eff += weight * a

    def _aggregate(self) -> Weights:
        tau_eff = self._tau_eff / self._weight
        logger.debug("fednova: %d updates, tau_eff %.2f", self.count, tau_eff)
        return {name: (self.global_weights[name] + tau_eff * self._sum[name] / self._weight
                       ).astype(FLOAT32) for name in self.shared}
