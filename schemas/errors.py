"""Typed errors of the wire contract.

Each error carries a short machine-readable ``reason`` so that services can
count refusals per reason, and builds its human message in ``__init__``.
"""

from __future__ import annotations


class SchemaError(Exception):
    """Base class of every error raised by :mod:`schemas`."""


class TopicError(SchemaError):
    """A topic or topic level is not acceptable."""


class InvalidIdError(TopicError):
    """An id (device, model, task, ...) is outside the allowed alphabet or length."""

    def __init__(self, kind: str, value: object, pattern: str) -> None:
        self.kind = kind
        self.value = value
        super().__init__(f"invalid {kind} {value!r}: must match {pattern}")


class InvalidTopicError(TopicError):
    """A publish topic contains wildcards or is otherwise malformed."""

    def __init__(self, topic: str, why: str) -> None:
        self.topic = topic
        super().__init__(f"invalid topic {topic!r}: {why}")


class UnknownTopicError(TopicError):
    """A received topic matches none of the documented topic kinds."""

    def __init__(self, topic: str, root: str) -> None:
        self.topic = topic
        super().__init__(f"topic {topic!r} is not an edgefl topic under root {root!r}")


class DecodeError(SchemaError):
    """A payload (JSON message or tensor container) could not be decoded.

    Attributes:
        reason: short code for counters, e.g. ``too_large``, ``invalid_json``,
            ``validation``, ``bad_header``, ``bad_dtype``, ``bad_shape``.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str, *, what: str = "payload") -> None:
        self.reason = reason
        self.detail = detail
        self.what = what
        super().__init__(f"cannot decode {what}: {reason}: {detail}")


class EncodeError(SchemaError):
    """A value cannot be encoded under the wire contract (e.g. over a size bound)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot encode: {reason}: {detail}")
