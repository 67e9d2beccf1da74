"""Typed errors of the alert engine. Each carries a short ``reason`` for counters."""

from __future__ import annotations


class AlertError(Exception):
    """Base class of every error raised by :mod:`cloud.alerts`."""

    reason = "alert_error"


class RuleError(AlertError):
    """A rules file (or a list of rules) is invalid; raised at start-up.

    Attributes:
        source: the file (or other label) the rules came from.
        rule: the offending rule's name, ``rules[i]`` when it has none, or
            ``None`` when the problem concerns the whole file.
        problem: what is wrong, in words.
    """

    reason = "bad_rule"

    def __init__(self, source: str, rule: str | None, problem: str) -> None:
        self.source = source
        self.rule = rule
        self.problem = problem
        where = source if rule is None else f"{source}: rule {rule!r}"
        super().__init__(f"{where}: {problem}")


class SnapshotError(AlertError):
    """A state snapshot cannot be restored (wrong format or malformed content)."""

    reason = "bad_snapshot"

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(f"cannot restore alert engine state: {why}")


class AcknowledgeError(AlertError):
    """An acknowledgement is refused (e.g. the acknowledger is not a valid id)."""

    reason = "bad_acknowledge"

    def __init__(self, device_id: str, rule: str, why: str) -> None:
        self.device_id = device_id
        self.rule = rule
        super().__init__(f"cannot acknowledge alert {device_id}/{rule}: {why}")
