"""Typed errors of the edge agent. Each carries a short ``reason`` for counters."""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of edge-agent errors."""

    reason = "edge_error"


class ModelLoadError(EdgeError):
    """A model file cannot be loaded by its runtime."""

    reason = "load_failed"

    def __init__(self, path: object, why: str) -> None:
        self.why = why
        super().__init__(f"cannot load model {path}: {why}")


class RuntimeUnavailableError(EdgeError):
    """No installed runtime can load this model format."""

    reason = "runtime_unavailable"

    def __init__(self, what: str) -> None:
        super().__init__(f"no inference runtime available for {what}")


class InferenceError(EdgeError):
    """An inference call failed (bad input shape or dtype, runtime error)."""

    reason = "inference_failed"

    def __init__(self, why: str) -> None:
        super().__init__(f"inference failed: {why}")


class PacketTooLargeError(EdgeError):
    """A publish would exceed the broker's advertised maximum packet size."""

    reason = "packet_too_large"

    def __init__(self, topic: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"refusing to publish {size} bytes on {topic}: broker maximum is {limit}")


class NotConnectedError(EdgeError):
    """The MQTT session is not connected."""

    reason = "not_connected"

    def __init__(self, what: str) -> None:
        super().__init__(f"not connected: cannot {what}")


class InstallError(EdgeError):
    """A model release was refused or failed to install.

    Attributes:
        reason: short code (``sha256_mismatch``, ``bad_signature``, ``chunk_out_of_range``...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
