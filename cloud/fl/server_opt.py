"""Server optimizers: FedAvgM, FedAdam, FedYogi and FedAdagrad.

Each round the server averages the client deltas like FedAvg into the
pseudo-gradient ``d = sum_i n_i delta_i / sum_i n_i`` and takes one optimizer
step with it, keeping the optimizer state across rounds.

FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data
distribution")::

    v_t = beta v_{t-1} + d ;  x_{t+1} = x_t + eta v_t

FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2; no bias correction, ``m_{-1} = 0``,
``v_{-1} = tau^2``)::

    m_t = b1 m_{t-1} + (1 - b1) d
    Adam:    v_t = b2 v_{t-1} + (1 - b2) d^2
    Yogi:    v_t = v_{t-1} - (1 - b2) d^2 sign(v_{t-1} - d^2)
    Adagrad: v_t = v_{t-1} + d^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

Defaults are Flower's (``eta`` 0.1, Yogi 0.01; ``b1`` 0.9, ``b2`` 0.99; ``tau``
1e-9, Yogi 1e-3). State is float32 and O(model size); it is reset by
:meth:`ServerOptimizer.reset_state`, and a round whose shared names or shapes
differ from the state's raises :class:`~cloud.fl.errors.RoundStateError`.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from cloud.fl.errors import RoundStateError
from cloud.fl.fedavg import FedAvg
from cloud.fl.strategy import ParamValue, Weights, param_float

logger = logging.getLogger(__name__)


class ServerOptimizer(FedAvg):
    """FedAvg's pseudo-gradient followed by a stateful server step."""

    name: ClassVar[str] = "server_optimizer"

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, dict[str, np.ndarray]] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.steps = 0

    def reset_state(self) -> None:
        """Forget the optimizer state (e.g. when the model changes)."""
        self._state = {}
        self._shapes = None
        self.steps = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Moments by ``slot/name``, and the step count (``_steps``)."""
        arrays = {f"{slot}/{name}": array for slot, by_name in sorted(self._state.items())
                  for name, array in sorted(by_name.items())}
        arrays["_steps"] = np.asarray([self.steps], dtype=np.int64)
        return arrays

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore moments and the step count saved by :meth:`state_arrays`."""
        self.reset_state()
        for key, array in arrays.items():
            if key == "_steps":
                self.steps = int(np.asarray(array).reshape(-1)[0])
                continue
            slot, _, name = key.partition("/")
            self._state.setdefault(slot, {})[name] = np.array(array, dtype=np.float32)
        if self._state:
            first = next(iter(self._state.values()))
            self._shapes = {name: a.shape for name, a in first.items()}

    def _on_begin(self) -> None:
        shapes = {name: self.global_weights[name].shape for name in self.shared}
        if self._shapes is not None and shapes != self._shapes:
            raise RoundStateError(
                f"{self.name}: the model differs from the optimizer state; call reset_state()"
            )
        super()._on_begin()

    def _slot(self, slot: str, name: str, fill: float) -> np.ndarray:
        """The state array ``slot`` of parameter ``name``, created filled with ``fill``."""
        arrays = self._state.setdefault(slot, {})
        if name not in arrays:
            arrays[name] = np.full(self.global_weights[name].shape, fill, dtype=np.float32)
        return arrays[name]

    def _aggregate(self) -> Weights:
        pseudo_gradient = self._mean_delta()
        out: Weights = {}
        for name in self.shared:
            step = self._step(name, pseudo_gradient.pop(name))
            np.add(self.global_weights[name], step, out=step)
            out[name] = step
        self._shapes = {name: self.global_weights[name].shape for name in self.shared}
        self.steps += 1
        return out

    @abstractmethod
    def _step(self, name: str, d: np.ndarray) -> np.ndarray:
        """Update the state of ``name`` with pseudo-gradient ``d``; return ``x_{t+1} - x_t``.

        ``d`` is a float32 array owned by the optimizer: it may be reused in place.
        """


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019).

    Args:
        server_lr: ``eta``, the server learning rate.
        momentum: ``beta`` in [0, 1); 0 with ``server_lr`` 1 is FedAvg.
    """

    name: ClassVar[str] = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = param_float(self.name, "server_lr", server_lr, gt=0.0)
        self.momentum = param_float(self.name, "momentum", momentum, ge=0.0, lt=1.0)

    def config(self) -> dict[str, ParamValue]:
        """The server learning rate and momentum."""
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def _step(self, name: str, d: np.ndarray) -> np.ndarray:
        velocity = self._slot("velocity", name, 0.0)
        np.multiply(velocity, np.float32(self.momentum), out=velocity)
        np.add(velocity, d, out=velocity)
        np.multiply(velocity, np.float32(self.server_lr), out=d)
        return d


class AdaptiveOptimizer(ServerOptimizer):
    """The common step of FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021).

    Args:
        eta: server learning rate.
        beta_1: first-moment decay in [0, 1).
        beta_2: second-moment decay in [0, 1) (unused by Adagrad).
        tau: adaptivity, > 0; ``v`` starts at ``tau^2``.
    """

    name: ClassVar[str] = "adaptive"

    def __init__(self, *, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-9) -> None:
        super().__init__()
        self.eta = param_float(self.name, "eta", eta, gt=0.0)
        self.beta_1 = param_float(self.name, "beta_1", beta_1, ge=0.0, lt=1.0)
        self.beta_2 = param_float(self.name, "beta_2", beta_2, ge=0.0, lt=1.0)
        self.tau = param_float(self.name, "tau", tau, gt=0.0)

    def config(self) -> dict[str, ParamValue]:
        """The learning rate, decays and adaptivity."""
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}

    def _step(self, name: str, d: np.ndarray) -> np.ndarray:
        m = self._slot("m", name, 0.0)
        v = self._slot("v", name, self.tau**2)
        tmp = np.empty_like(d)
        np.multiply(d, np.float32(1.0 - self.beta_1), out=tmp)
        np.multiply(m, np.float32(self.beta_1), out=m)
        np.add(m, tmp, out=m)
        np.square(d, out=d)
        self._second_moment(v, d, tmp)
        step = tmp
        np.sqrt(v, out=step)
        np.add(step, np.float32(self.tau), out=step)
        np.divide(m, step, out=step)
        np.multiply(step, np.float32(self.eta), out=step)
        return step

    @abstractmethod
    def _second_moment(self, v: np.ndarray, d_squared: np.ndarray, scratch: np.ndarray) -> None:
        """Update ``v`` in place from ``d^2``; ``d_squared`` and ``scratch`` may be clobbered."""


class FedAdam(AdaptiveOptimizer):
    """Adam on the server: ``v_t = b2 v + (1 - b2) d^2``."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: np.ndarray, d_squared: np.ndarray, scratch: np.ndarray) -> None:
        np.multiply(v, np.float32(self.beta_2), out=v)
        np.multiply(d_squared, np.float32(1.0 - self.beta_2), out=scratch)
        np.add(v, scratch, out=v)


class FedYogi(AdaptiveOptimizer):
    """Yogi on the server: ``v_t = v - (1 - b2) d^2 sign(v - d^2)``."""

    name: ClassVar[str] = "fedyogi"

    def __init__(self, *, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: np.ndarray, d_squared: np.ndarray, scratch: np.ndarray) -> None:
        np.subtract(v, d_squared, out=scratch)
        np.sign(scratch, out=scratch)
        np.multiply(scratch, d_squared, out=scratch)
        np.multiply(scratch, np.float32(1.0 - self.beta_2), out=scratch)
        np.subtract(v, scratch, out=v)


class FedAdagrad(AdaptiveOptimizer):
    """Adagrad on the server: ``v_t = v + d^2`` (``beta_2`` is unused)."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v: np.ndarray, d_squared: np.ndarray, scratch: np.ndarray) -> None:
        del scratch
        np.add(v, d_squared, out=v)
