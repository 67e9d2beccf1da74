"""Federated aggregation: streaming strategies, update validation, the registry.

Pure numpy: nothing here talks MQTT or imports torch; the coordinator feeds the
strategies with decoded updates (see :mod:`cloud.fl.strategy`).
"""

from cloud.fl.errors import (
    IncompatibleUpdateError,
    NoUpdatesError,
    RoundStateError,
    StrategyConfigError,
    StrategyError,
    UnknownStrategyError,
)
from cloud.fl.registry import STRATEGIES, make_strategy
from cloud.fl.strategy import Strategy, Weights
from cloud.fl.validation import RejectReason, UpdateRejection, validate_update

__all__ = [
    "STRATEGIES",
    "IncompatibleUpdateError",
    "NoUpdatesError",
    "RejectReason",
    "RoundStateError",
    "Strategy",
    "StrategyConfigError",
    "StrategyError",
    "UnknownStrategyError",
    "UpdateRejection",
    "Weights",
    "make_strategy",
    "validate_update",
]
