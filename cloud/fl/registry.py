"""Strategies by name: what a task's configuration and a round plan's ``strategy`` say."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Final

from cloud.fl.errors import StrategyConfigError, UnknownStrategyError
from cloud.fl.fedavg import FedAvg
from cloud.fl.fedbn import FedBN
from cloud.fl.fednova import FedNova
from cloud.fl.fedprox import FedProx
from cloud.fl.robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean
from cloud.fl.scaffold import Scaffold
from cloud.fl.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from cloud.fl.strategy import Strategy

logger = logging.getLogger(__name__)

STRATEGIES: Final[dict[str, type[Strategy]]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, FedBN,
        CoordinateMedian, TrimmedMean, Krum, MultiKrum, Scaffold, FedNova,
    )
}
"""Registered strategies by name."""


def make_strategy(name: str, params: Mapping[str, object] | None = None) -> Strategy:
    """A new strategy from its name and keyword parameters.

    Args:
        name: one of :data:`STRATEGIES` (``fedavg``, ``fedadam``, ``krum``, ...).
        params: the strategy's keyword arguments, e.g. ``{"eta": 0.01}``.

    Raises:
        UnknownStrategyError: no strategy has this name.
        StrategyConfigError: a parameter is unknown, missing, mistyped or out of range.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise UnknownStrategyError(name, sorted(STRATEGIES))
    params = dict(params or {})
    if not all(isinstance(key, str) for key in params):
        raise StrategyConfigError(name, f"parameter names must be strings: {list(params)}")
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as exc:
        accepted = list(inspect.signature(cls).parameters)
        raise StrategyConfigError(name, f"{exc}; accepted: {accepted}") from None
    factory: Callable[..., Strategy] = cls
    strategy = factory(**params)
    logger.debug("made strategy %s with %s", name, strategy.config())
    return strategy
