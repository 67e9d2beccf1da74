"""Typed errors of federated tasks (no torch: the cloud catches them without loading it)."""

from __future__ import annotations


class TaskError(Exception):
    """Base class of the errors of :mod:`fl_tasks`.

    Attributes:
        reason: short code for counters and logs, e.g. ``bad_path``, ``shape``.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class TaskLoadError(TaskError):
    """A task path cannot be loaded: malformed, not importable, not an FLTask, bad arguments."""


class TaskConfigError(TaskError):
    """A task, partition or data argument is out of range."""


class WeightsMismatchError(TaskError):
    """Weights do not fit the model: missing or unexpected names, wrong shapes or values."""


class TrainingError(TaskError):
    """Local training cannot run or diverged (no data, non-finite loss)."""

__all__ = ["TaskConfigError", "TaskError", "TaskLoadError", "TrainingError",
           "WeightsMismatchError"]
