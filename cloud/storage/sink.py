"""The TelemetrySink interface and the values written through it.

Two real implementations: SQLite (the embedded default, `sqlite_store.py`) and
InfluxDB through influxdb-client (`influx_sink.py`). Calls are synchronous and
batched; the cloud's ingest component calls them from a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from schemas.alerts import Alert, CloudHealth
from schemas.device import DeploymentStatus, DeviceTelemetry, ModelMetrics
from schemas.fl import TaskStatus

RolloutEventKind = Literal["started", "stage", "experiment", "promoted", "completed",
                           "aborted"]


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    """One step of a model rollout, as the rollout manager takes it.

    Attributes:
        rollout: the rollout's id.
        model: model name.
        version: the version rolled out.
        event: what happened.
        at: Unix time, s.
        stage: the stage (0-based) at that moment.
        targets: devices targeted so far.
        installed: targeted devices that installed it.
        failed: targeted devices that failed or rolled back.
        detail: why (an abort's reason), or None.
    """

    rollout: int
    model: str
    version: str
    event: RolloutEventKind
    at: float
    stage: int
    targets: int
    installed: int
    failed: int
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One alert transition: opened, acknowledged or resolved.

    Attributes:
        alert: the alert as published (for ``resolved``: as it was when it resolved).
        transition: what happened.
        at: Unix time of the transition, s.
        site: the device's site label, when known (a low-cardinality tag).
    """

    alert: Alert
    transition: Literal["opened", "acknowledged", "resolved"]
    at: float
    site: str | None = None


@dataclass(frozen=True, slots=True)
class SinkStats:
    """Counters a sink exposes (the cloud alerts on its own health with them)."""

    written: int = 0
    retried: int = 0
    failed_batches: int = 0
    dropped: int = 0
    buffered: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class TelemetrySink(Protocol):
    """Where validated messages are stored.

    Implementations are idempotent for telemetry and model metrics keyed on
    (device_id, session_id, seq).
    """

    def write_telemetry(self, batch: Sequence[DeviceTelemetry], *,
                        sites: dict[str, str] | None = None) -> None:
        """Store device telemetry (``sites``: device_id -> site label)."""

    def write_model_metrics(self, batch: Sequence[ModelMetrics], *,
                            sites: dict[str, str] | None = None) -> None:
        """Store model metrics."""

    def write_deployment_status(self, batch: Sequence[DeploymentStatus]) -> None:
        """Store deployment status changes."""

    def write_alert_events(self, batch: Sequence[AlertEvent]) -> None:
        """Store alert transitions."""

    def write_fl_round(self, status: TaskStatus) -> None:
        """Store one federated round's record."""

    def write_cloud_health(self, health: CloudHealth) -> None:
        """Store the service's own counters (every few seconds)."""

    def write_rollout_event(self, event: RolloutEvent) -> None:
        """Store one step of a model rollout (started, a stage, the end)."""

    def flush(self) -> None:
        """Push anything buffered."""

    def stats(self) -> SinkStats:
        """Counters since start."""

    def close(self) -> None:
        """Flush and release resources."""
