"""A/B experiments between two versions of a model, and what the fleet measured of each.

An A/B rollout (``edgefl model release N A --ab B --split 50``) keeps version A
on one group of devices and installs B on the other. The groups come from a hash
of the model, both versions and the device id (:func:`ab_assign`): the same
fleet always splits the same way, and another pair of versions splits afresh.

:func:`fleet_figures` summarises the ``ModelMetrics`` the devices of a group sent
for a version since a moment; :func:`compare` sets the two side by side with
significance tests from scipy:

- latency: two-sided Mann-Whitney U over the per-window medians of each device
  (windows overlap and come from few devices, so read the p-value as a guide,
  and the sample sizes next to it);
- error rate: Fisher's exact test on the counts of failed and good inferences
  (``interval_count`` / ``interval_errors``, which add up over time);
- accuracy (labelled feedback only): Mann-Whitney U over per-window accuracies.

All functions read the store: call them off the event loop.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy import stats

from cloud.storage.sqlite_store import SqliteStore

BUCKETS = 10_000


def ab_bucket(model: str, version_a: str, version_b: str, device_id: str) -> float:
    """A device's place in [0, 100) for the experiment between ``version_a`` and ``version_b``."""
    digest = hashlib.sha256(f"{model}\x00{version_a}\x00{version_b}\x00{device_id}".encode())
    return (int.from_bytes(digest.digest()[:8], "big") % BUCKETS) * 100 / BUCKETS


def ab_assign(model: str, version_a: str, version_b: str, device_ids: Sequence[str],
              split_percent: float) -> tuple[list[str], list[str]]:
    """The devices that keep A and those that take B (``split_percent`` of them, by hash)."""
    group_a: list[str] = []
    group_b: list[str] = []
    for device in sorted(set(device_ids)):
        bucket = ab_bucket(model, version_a, version_b, device)
        (group_b if bucket < split_percent else group_a).append(device)
    return group_a, group_b


@dataclass(slots=True)
class FleetFigures:
    """What the devices measured of one version (``ModelMetrics`` since a moment)."""

    version: str
    devices: int = 0
    windows: int = 0
    inferences: int = 0
    errors: int = 0
    latency_ms_p50: float | None = None
    """Median of the windows' medians."""
    latency_ms_p95: float | None = None
    """Median of the windows' 95th percentiles."""
    accuracy: float | None = None
    """Mean of the windows' accuracies on labelled feedback."""
    accuracy_windows: int = 0
    p50_samples: list[float] = field(default_factory=list, repr=False)
    accuracy_samples: list[float] = field(default_factory=list, repr=False)

    @property
    def error_rate_percent(self) -> float | None:
        """Failed / all inferences, %."""
        return 100 * self.errors / self.inferences if self.inferences else None

    def as_registry_metrics(self) -> dict[str, float]:
        """The figures the registry keeps for the version (source ``fleet``)."""
        values = {"fleet_devices": float(self.devices), "fleet_inferences": float(self.inferences)}
        for name, value in (("latency_ms_p50", self.latency_ms_p50),
                            ("latency_ms_p95", self.latency_ms_p95),
                            ("error_rate_percent", self.error_rate_percent),
                            ("accuracy", self.accuracy)):
            if value is not None:
                values[name] = float(value)
        return values

    def as_json(self) -> dict[str, Any]:
        """JSON-ready (without the raw samples)."""
        out = asdict(self)
        out.pop("p50_samples")
        out.pop("accuracy_samples")
        out["error_rate_percent"] = self.error_rate_percent
        return out


def fleet_figures(store: SqliteStore, model: str, version: str, since: float,
                  devices: Sequence[str] | None = None) -> FleetFigures:
    """Summary of the ``ModelMetrics`` of ``version`` sent at or after ``since``.

    Args:
        store: the cloud store.
        model: model name.
        version: the version measured.
        since: unix time of the first window counted.
        devices: only these devices (None: every device).
    """
    rows = store.query(
        "SELECT device_id, latency_ms_p50, latency_ms_p95, accuracy, interval_count, "
        "interval_errors FROM model_metrics WHERE model=? AND version=? AND ts>=? "
        "AND historical=0 ORDER BY ts", (model, version, since))
    allowed = set(devices) if devices is not None else None
    figures = FleetFigures(version)
    seen: set[str] = set()
    p95: list[float] = []
    for row in rows:
        if allowed is not None and row["device_id"] not in allowed:
            continue
        seen.add(row["device_id"])
        figures.windows += 1
        figures.inferences += int(row["interval_count"] or 0)
        figures.errors += int(row["interval_errors"] or 0)
        if row["latency_ms_p50"] is not None:
            figures.p50_samples.append(float(row["latency_ms_p50"]))
        if row["latency_ms_p95"] is not None:
            p95.append(float(row["latency_ms_p95"]))
        if row["accuracy"] is not None:
            figures.accuracy_samples.append(float(row["accuracy"]))
    figures.devices = len(seen)
    if figures.p50_samples:
        figures.latency_ms_p50 = statistics.median(figures.p50_samples)
    if p95:
        figures.latency_ms_p95 = statistics.median(p95)
    if figures.accuracy_samples:
        figures.accuracy = statistics.fmean(figures.accuracy_samples)
        figures.accuracy_windows = len(figures.accuracy_samples)
    return figures


@dataclass(frozen=True, slots=True)
class Comparison:
    """Two versions side by side, with the tests' p-values (None: too few samples)."""

    a: FleetFigures
    b: FleetFigures
    latency_p_value: float | None
    error_rate_p_value: float | None
    accuracy_p_value: float | None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"a": self.a.as_json(), "b": self.b.as_json(),
                "latency_p_value": self.latency_p_value,
                "error_rate_p_value": self.error_rate_p_value,
                "accuracy_p_value": self.accuracy_p_value,
                "tests": {"latency": "Mann-Whitney U (two-sided) on per-window p50",
                          "error_rate": "Fisher exact (two-sided) on inference counts",
                          "accuracy": "Mann-Whitney U (two-sided) on per-window accuracy"}}


def _mann_whitney(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or len(y) < 2:
        return None
    if len(set(x) | set(y)) == 1:
        return 1.0  # every sample equal: no difference to find
    p = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return None if math.isnan(p) else p


def compare(a: FleetFigures, b: FleetFigures) -> Comparison:
    """Significance of the differences between ``a`` and ``b``."""
    error_p: float | None = None
    if a.inferences and b.inferences:
        table = [[a.errors, a.inferences - a.errors], [b.errors, b.inferences - b.errors]]
        error_p = float(stats.fisher_exact(table, alternative="two-sided").pvalue)
    return Comparison(a, b, _mann_whitney(a.p50_samples, b.p50_samples), error_p,
                      _mann_whitney(a.accuracy_samples, b.accuracy_samples))
