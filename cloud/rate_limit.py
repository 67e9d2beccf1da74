"""A per-device budget: token buckets on messages and bytes per second.

Whatever one device sends, it gets at most its share of the service: a message
over its budget is refused (counted as ``rate_limited``) before its payload is
even decoded. Well-behaved agents pace the replay of their outbox below the
default budget, so only a flood is refused. The state is one small record per
device id, and device ids are bounded by provisioning (the broker's ACL lets a
device publish under its own id only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import Field

from schemas.client_settings import SettingsSection

MiB = 1024 * 1024


class RateLimitSettings(SettingsSection):
    """The budget of each device (both buckets must have room)."""

    enabled: bool = True
    messages_per_s: float = Field(default=100.0, gt=0)
    message_burst: float = Field(default=2_000.0, ge=1)
    bytes_per_s: float = Field(default=8 * MiB, gt=0)
    byte_burst: float = Field(default=64 * MiB, ge=1,
                              description="At least the largest update a device may send")


@dataclass(slots=True)
class _Buckets:
    messages: float
    bytes: float
    updated: float


class DeviceBudget:
    """Token buckets per device id."""

    def __init__(self, settings: RateLimitSettings) -> None:
        self.settings = settings
        self._devices: dict[str, _Buckets] = {}

    def allow(self, device_id: str, size: int, now: float | None = None) -> bool:
        """Take one message of ``size`` bytes from ``device_id``'s budget, if it has room."""
        s = self.settings
        if not s.enabled:
            return True
        at = time.monotonic() if now is None else now
        buckets = self._devices.get(device_id)
        if buckets is None:
            buckets = self._devices[device_id] = _Buckets(s.message_burst, s.byte_burst, at)
        elapsed = max(0.0, at - buckets.updated)
        buckets.updated = at
        buckets.messages = min(s.message_burst, buckets.messages + elapsed * s.messages_per_s)
        buckets.bytes = min(s.byte_burst, buckets.bytes + elapsed * s.bytes_per_s)
        if buckets.messages < 1.0 or buckets.bytes < size:
            return False
        buckets.messages -= 1.0
        buckets.bytes -= size
        return True
