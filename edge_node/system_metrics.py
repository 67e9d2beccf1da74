"""Device health measured with psutil; a value the hardware cannot give is None."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import psutil

from schemas.device import HardwareInfo

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One psutil reading."""

    cpu_percent: float
    memory_percent: float
    memory_available_mb: float
    disk_percent: float
    temperature_c: float | None
    battery_percent: float | None
    battery_plugged: bool | None
    uptime_s: float


def hottest_temperature() -> float | None:
    """Highest current reading of any temperature sensor, or None without sensors."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries
                if t.current is not None and -90.0 <= t.current <= 200.0]
    return max(readings) if readings else None


def sample(data_path: str | os.PathLike[str] = "/") -> SystemSample:
    """Read CPU (since the previous call), memory, disk, temperature, battery, uptime."""
    memory = psutil.virtual_memory()
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return SystemSample(
        cpu_percent=min(100.0, psutil.cpu_percent(interval=None)),
        memory_percent=memory.percent,
        memory_available_mb=memory.available / MiB,
        disk_percent=psutil.disk_usage(os.fspath(data_path)).percent,
        temperature_c=hottest_temperature(),
        battery_percent=None if battery is None else min(100.0, max(0.0, battery.percent)),
        battery_plugged=None if battery is None else bool(battery.power_plugged),
        uptime_s=max(0.0, time.time() - psutil.boot_time()),
    )


def hardware_info(data_path: str | os.PathLike[str] = "/") -> HardwareInfo:
    """What this machine declares in its birth message."""
    return HardwareInfo(
        platform=platform.system() or "unknown",
        machine=platform.machine() or "unknown",
        cpu_count=psutil.cpu_count(logical=True) or 1,
        memory_total_mb=psutil.virtual_memory().total / MiB,
        disk_total_mb=psutil.disk_usage(os.fspath(data_path)).total / MiB,
    )
