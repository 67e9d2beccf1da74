"""Typed errors of federated aggregation."""

from __future__ import annotations

from cloud.errors import CloudError


class StrategyError(CloudError):
    """Base class of aggregation-strategy errors."""


class StrategyConfigError(StrategyError):
    """A strategy name or parameter is not acceptable.

    Attributes:
        strategy: the strategy asked for.
        detail: what is wrong.
    """

    def __init__(self, strategy: str, detail: str) -> None:
        self.strategy = strategy
        self.detail = detail
        super().__init__(f"strategy {strategy!r}: {detail}")


class UnknownStrategyError(StrategyConfigError):
    """No strategy is registered under this name."""

    def __init__(self, strategy: str, known: list[str]) -> None:
        super().__init__(strategy, f"unknown strategy, known: {', '.join(known)}")


class RoundStateError(StrategyError):
    """A call out of order: ``add``/``finalize`` outside a round, or the model changed."""


class NoUpdatesError(RoundStateError):
    """``finalize`` was called before any update was added."""

    def __init__(self, strategy: str) -> None:
        super().__init__(f"{strategy}: no update was added in this round")


class IncompatibleUpdateError(StrategyError):
    """An update does not fit the round's global model.

    Attributes:
        reason: the same codes as :class:`cloud.fl.validation.RejectReason`, e.g.
            ``missing_tensor``, ``shape_mismatch``, or ``bad_weight``.
        detail: what is wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update refused: {reason}: {detail}")
