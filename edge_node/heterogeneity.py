"""A heterogeneous simulated fleet: slow devices, devices that come and go, failures.

Real fleets are not twenty identical, always-on machines. ``edgefl fleet
--profile FILE`` reads a :class:`HeterogeneityProfile` and gives each device, from
the profile's seed alone (the same seed, the same fleet), a speed factor (its
training takes that many times as long), an availability schedule (online and
offline periods, exponentially distributed around their means) and a failure rate
(the chance that it drops a round it was selected for). An offline period is a
power cycle: the agent stops (offline state, disconnect) and a new one starts on the
same state folder when the period ends, so the outbox, the installed models and the
federated state carry over as on a real device.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Self

from pydantic import Field, model_validator

from schemas.client_settings import SettingsSection

logger = logging.getLogger(__name__)


class HeterogeneityProfile(SettingsSection):
    """How the simulated fleet differs from device to device (``fleet --profile``)."""

    seed: int = 0
    slow_fraction: float = Field(default=0.0, ge=0, le=1,
                                 description="Share of devices that train slowly")
    base_factor: float = Field(
        default=1.0, ge=1, le=1000, description="Training-time multiplier of every device: "
        "a processor class slower than the machine that simulates it (a Raspberry Pi is "
        "tens of times slower than a laptop core)")
    slow_factor: float = Field(default=10.0, ge=1, le=1000,
                               description="Training-time multiplier of the slow devices")
    intermittent_fraction: float = Field(default=0.0, ge=0, le=1,
                                         description="Share of devices that go offline")
    online_s: float = Field(default=60.0, gt=0, description="Mean online period, s")
    offline_s: float = Field(default=60.0, gt=0, description="Mean offline period, s")
    failure_rate: float = Field(default=0.0, ge=0, le=1, description="Chance that a device "
                                "drops a round it was selected for (every device)")
    horizon_s: float = Field(default=86_400.0, gt=0,
                             description="Length of the availability schedules drawn, s")

    @model_validator(mode="after")
    def _speed_bounded(self) -> Self:
        if self.base_factor * self.slow_factor > 1000:
            raise ValueError("base_factor * slow_factor must be at most 1000")
        return self


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One device's share of the profile."""

    device_id: str
    speed_factor: float
    failure_rate: float
    offline: tuple[tuple[float, float], ...]
    """Offline periods, (start, end) in seconds from the fleet's start."""
    seed: int

    def online_at(self, t: float) -> bool:
        """Whether the device is online ``t`` seconds after the fleet started."""
        return not any(start <= t < end for start, end in self.offline)


def device_profiles(profile: HeterogeneityProfile,
                    device_ids: list[str]) -> dict[str, DeviceProfile]:
    """Each device's profile, a function of the profile (seed included) and the ids only."""
    ids = sorted(device_ids)
    rng = random.Random(profile.seed)  # noqa: S311 - a reproducible simulation, not crypto
    slow = set(rng.sample(ids, round(profile.slow_fraction * len(ids))))
    intermittent = set(rng.sample(ids, round(profile.intermittent_fraction * len(ids))))
    out: dict[str, DeviceProfile] = {}
    for device_id in ids:
        windows: list[tuple[float, float]] = []
        if device_id in intermittent:
            t = rng.expovariate(1 / profile.online_s)  # starts online, for a while
            while t < profile.horizon_s:
                length = rng.expovariate(1 / profile.offline_s)
                windows.append((round(t, 3), round(t + length, 3)))
                t += length + rng.expovariate(1 / profile.online_s)
        out[device_id] = DeviceProfile(
            device_id=device_id,
            speed_factor=profile.base_factor * (profile.slow_factor if device_id in slow
                                                else 1.0),
            failure_rate=profile.failure_rate, offline=tuple(windows),
            seed=rng.getrandbits(32))
    return out
