"""Typed errors of the cloud service."""

from __future__ import annotations


class CloudError(Exception):
    """Base class of cloud errors."""


class IngestRefused(CloudError):  # noqa: N818 - a refusal, not a failure of ours
    """A message was refused at the boundary; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class UnknownDeviceError(CloudError):
    """The device is not in the registry."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"unknown device {device_id!r}")


class CloudOffline(CloudError):  # noqa: N818 - a state, like ConnectionRefused
    """The service is not connected to the broker (or the connection failed mid-call)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)
