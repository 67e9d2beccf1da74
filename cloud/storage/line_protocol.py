"""InfluxDB line protocol for edgefl's measurements, built as plain strings.

Pre-built strings are written about five times faster by influxdb-client than
``Point`` objects, so the sink builds them here. The schema follows InfluxDB's
guidance: tags only for low-cardinality identifiers (device, site, model, rule,
...), everything measured as fields. :data:`SCHEMA` states exactly which tags and
fields each measurement gets; the Grafana dashboards are checked against it.

A point is identified by measurement, tag set and timestamp, so writing the same
message twice overwrites the first point: writes are idempotent for a message
replayed with its original ``ts``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Final, Literal

from cloud.storage.sink import AlertEvent, RolloutEvent
from schemas.alerts import CloudHealth
from schemas.device import DeploymentStatus, DeviceTelemetry, ModelMetrics
from schemas.fl import TaskStatus

Precision = Literal["s", "ms", "us", "ns"]
FieldValue = float | int | bool | str
"""A field value; ``bool`` is written as ``true``/``false``, ``int`` with the ``i`` suffix."""

TELEMETRY: Final = "device_telemetry"
MODEL_METRICS: Final = "model_metrics"
ALERTS: Final = "alerts"
FL_ROUNDS: Final = "fl_rounds"
DEPLOYMENT_STATUS: Final = "deployment_status"
CLOUD_HEALTH: Final = "cloud_health"
CLOUD_REFUSALS: Final = "cloud_refusals"
ROLLOUT_EVENTS: Final = "rollout_events"
_HEALTH_COUNTS: Final = ("accepted", "stored", "duplicates", "rate_limited", "refused")

_PRECISION_FACTOR: Final[dict[str, int]] = {
    "s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000,
}
# Line protocol escapes as in influxdb-client's own serializer; a newline cannot
# appear unescaped anywhere in a line, so it is written as the two characters `\n`.
_ESCAPE_MEASUREMENT: Final = str.maketrans(
    {",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY: Final = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING: Final = str.maketrans(
    {'"': r"\"", "\\": "\\\\", "\n": r"\n", "\r": r"\r"})

# Field types per measurement: each field always has the same type, as InfluxDB
# refuses a point whose field type differs from the one already stored.
_TELEMETRY_FLOATS: Final = (
    "cpu_percent", "memory_percent", "disk_percent", "temperature_c", "battery_percent",
    "network_latency_ms", "error_rate_percent", "uptime_s", "interval_s",
)
_TELEMETRY_INTS: Final = ("prediction_count", "error_count", "seq")
_TELEMETRY_FLAGS: Final = ("battery_plugged", "historical")
_METRICS_FLOATS: Final = (
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
    "throughput_per_s", "memory_mb", "cpu_percent", "error_rate_percent", "accuracy",
    "window_s",
)
_METRICS_INTS: Final = ("sample_count", "error_count", "interval_count", "interval_errors")
_FL_FLOATS: Final = (
    "train_loss", "eval_loss", "eval_accuracy", "central_accuracy", "duration_s",
    "epsilon_spent",
)
_FAIRNESS: Final = ("mean", "std", "cv", "disparity")

SCHEMA: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    TELEMETRY: (
        frozenset({"device_id", "site"}),
        frozenset({*_TELEMETRY_FLOATS, *_TELEMETRY_INTS, *_TELEMETRY_FLAGS}),
    ),
    MODEL_METRICS: (
        frozenset({"device_id", "model", "version", "runtime", "site"}),
        frozenset({*_METRICS_FLOATS, *_METRICS_INTS}),
    ),
    ALERTS: (
        frozenset({"device_id", "rule", "severity", "site"}),
        frozenset({"value", "threshold", "active", "acknowledged", "transition"}),
    ),
    FL_ROUNDS: (
        frozenset({"task"}),
        frozenset({"round", "participants", "rejected", "bytes_received", *_FL_FLOATS,
                   *(f"fairness_{name}" for name in _FAIRNESS)}),
    ),
    DEPLOYMENT_STATUS: (
        frozenset({"device_id", "model", "state"}),
        frozenset({"chunks_received", "chunks_total", "active_version"}),
    ),
    ROLLOUT_EVENTS: (
        frozenset({"model", "version", "event"}),
        frozenset({"rollout", "stage", "targets", "installed", "failed", "detail"}),
    ),
    CLOUD_HEALTH: (
        frozenset({"instance", "kind"}),
        frozenset({*_HEALTH_COUNTS, "errors", "queue_pending", "queue_acks",
                   "queue_alert_outbox", "queue_fl_inbox", "connected"}),
    ),
    CLOUD_REFUSALS: (
        frozenset({"instance", "kind", "reason"}),
        frozenset({"count"}),
    ),
}
"""measurement -> (tag keys, field keys): exactly what the builders below write."""


# Names and tag values are few (low cardinality by design): escaping is cached.
@functools.lru_cache(maxsize=256)
def escape_measurement(name: str) -> str:
    """Escape a measurement name (commas, spaces, control characters)."""
    return name.translate(_ESCAPE_MEASUREMENT)


@functools.lru_cache(maxsize=4096)
def escape_key(key: str) -> str:
    """Escape a tag key or a field key (commas, equals signs, spaces, control characters)."""
    return key.translate(_ESCAPE_KEY)


@functools.lru_cache(maxsize=65_536)
def escape_tag_value(value: str) -> str:
    """Escape a tag value like a key; a trailing backslash gets a space so it escapes nothing."""
    escaped = value.translate(_ESCAPE_KEY)
    return escaped + " " if escaped.endswith("\\") else escaped


def format_string_field(value: str) -> str:
    """A string field value: double-quoted, with quotes and backslashes escaped."""
    return '"' + value.translate(_ESCAPE_STRING) + '"'


def format_field_value(value: FieldValue) -> str | None:
    """Render one field value, or ``None`` for a float that is not finite (not writable).

    Args:
        value: ``bool`` -> ``true``/``false``; ``int`` -> ``12i``; ``float`` -> its
            ``repr`` (``1.5``, ``1e-07``); ``str`` -> a quoted, escaped string.

    Returns:
        The value as it appears after ``key=``, or ``None`` to omit the field.

    Raises:
        TypeError: the value has none of those types.
    """
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return format_string_field(value)
    raise TypeError(f"unsupported field type {type(value).__name__}")


def timestamp(ts: float, precision: Precision = "ms") -> int:
    """Unix time in seconds to an integer timestamp at ``precision``."""
    return round(ts * _PRECISION_FACTOR[precision])


def make_line(
    measurement: str,
    tags: Mapping[str, str | None],
    fields: Mapping[str, FieldValue | None],
    ts: int | None = None,
) -> str | None:
    """One line of line protocol.

    Tags are sorted by key (what InfluxDB recommends); tags that are ``None`` or empty
    and fields that are ``None`` (or non-finite floats) are omitted.

    Args:
        measurement: the measurement name.
        tags: tag key -> value.
        fields: field key -> value.
        ts: timestamp, already at the write precision; ``None`` lets the server stamp it.

    Returns:
        The line without a newline, or ``None`` when no field is left (InfluxDB refuses
        a point without fields).
    """
    rendered = []
    for key, value in fields.items():
        if value is None:
            continue
        text = format_field_value(value)
        if text is not None:
            rendered.append(f"{escape_key(key)}={text}")
    if not rendered:
        return None
    head = escape_measurement(measurement)
    tag_text = "".join(
        f",{escape_key(key)}={escape_tag_value(value)}"
        for key, value in sorted(tags.items()) if value
    )
    line = f"{head}{tag_text} {','.join(rendered)}"
    return line if ts is None else f"{line} {ts}"


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


def telemetry_line(msg: DeviceTelemetry, site: str | None = None,
                   precision: Precision = "ms") -> str | None:
    """``device_telemetry``: device health, tagged by device and site."""
    fields: dict[str, FieldValue | None] = {
        name: _float(getattr(msg, name)) for name in _TELEMETRY_FLOATS
    }
    fields.update((name, int(getattr(msg, name))) for name in _TELEMETRY_INTS)
    fields.update((name, _flag(getattr(msg, name))) for name in _TELEMETRY_FLAGS)
    return make_line(TELEMETRY, {"device_id": msg.device_id, "site": site}, fields,
                     timestamp(msg.ts, precision))


def model_metrics_line(msg: ModelMetrics, site: str | None = None,
                       precision: Precision = "ms") -> str | None:
    """``model_metrics``: one model's window of inferences on one device."""
    fields: dict[str, FieldValue | None] = {
        name: _float(getattr(msg, name)) for name in _METRICS_FLOATS
    }
    fields.update((name, int(getattr(msg, name))) for name in _METRICS_INTS)
    tags = {"device_id": msg.device_id, "model": msg.model, "version": msg.version,
            "runtime": msg.runtime.value, "site": site}
    return make_line(MODEL_METRICS, tags, fields, timestamp(msg.ts, precision))


def alert_event_line(event: AlertEvent, precision: Precision = "ms") -> str | None:
    """``alerts``: one alert transition, stamped with the time of the transition.

    ``active`` is 1 while the alert is open (opened or acknowledged), 0 once resolved;
    ``acknowledged`` is 1 when the alert was acknowledged (for ``resolved``: before it
    resolved).
    """
    alert = event.alert
    acknowledged = (event.transition == "acknowledged" or alert.state == "acknowledged"
                    or alert.acknowledged_by is not None)
    fields: dict[str, FieldValue | None] = {
        "value": _float(alert.value),
        "threshold": _float(alert.threshold),
        "active": int(event.transition != "resolved"),
        "acknowledged": int(acknowledged),
        "transition": event.transition,
    }
    tags = {"device_id": alert.device_id, "rule": alert.rule,
            "severity": alert.severity.value, "site": event.site}
    return make_line(ALERTS, tags, fields, timestamp(event.at, precision))


def fl_round_line(status: TaskStatus, precision: Precision = "ms") -> str | None:
    """``fl_rounds``: a federated task's progress as published in its status."""
    fields: dict[str, FieldValue | None] = {
        "round": status.round,
        "participants": len(status.participants),
        "rejected": len(status.rejected),
        "bytes_received": status.bytes_received,
    }
    fields.update((name, _float(getattr(status, name))) for name in _FL_FLOATS)
    fairness = status.fairness
    fields.update(
        (f"fairness_{name}", None if fairness is None else float(getattr(fairness, name)))
        for name in _FAIRNESS
    )
    return make_line(FL_ROUNDS, {"task": status.task}, fields,
                     timestamp(status.ts, precision))


def deployment_status_line(status: DeploymentStatus,
                           precision: Precision = "ms") -> str | None:
    """``deployment_status``: install progress of one model on one device.

    A status with neither chunk counts nor an active version has no field and is
    skipped (``None``).
    """
    fields: dict[str, FieldValue | None] = {
        "chunks_received": status.chunks_received,
        "chunks_total": status.chunks_total,
        "active_version": status.active_version,
    }
    tags = {"device_id": status.device_id, "model": status.model,
            "state": status.state.value}
    return make_line(DEPLOYMENT_STATUS, tags, fields, timestamp(status.ts, precision))


def rollout_event_line(event: RolloutEvent, precision: Precision = "ms") -> str | None:
    """``rollout_events``: one step of a model rollout (a Grafana annotation or table)."""
    fields: dict[str, FieldValue | None] = {
        "rollout": event.rollout, "stage": event.stage, "targets": event.targets,
        "installed": event.installed, "failed": event.failed, "detail": event.detail,
    }
    return make_line(ROLLOUT_EVENTS, {"model": event.model, "version": event.version,
                                      "event": event.event}, fields,
                     timestamp(event.at, precision))


def cloud_health_lines(health: CloudHealth, precision: Precision = "ms") -> list[str]:
    """The service's counters: ``cloud_health`` per kind, ``cloud_refusals`` per reason.

    ``cloud_health`` of kind ``all`` carries the errors and the queue depths.
    Counters are cumulative since the store was set up.
    """
    at = timestamp(health.ts, precision)
    lines: list[str | None] = []
    kinds = sorted(set(health.accepted) | set(health.stored) | set(health.duplicates)
                   | set(health.rate_limited) | set(health.refused))
    for kind in kinds:
        fields: dict[str, FieldValue | None] = {
            "accepted": health.accepted.get(kind, 0), "stored": health.stored.get(kind, 0),
            "duplicates": health.duplicates.get(kind, 0),
            "rate_limited": health.rate_limited.get(kind, 0),
            "refused": sum(health.refused.get(kind, {}).values()),
        }
        lines.append(make_line(CLOUD_HEALTH, {"instance": health.instance, "kind": kind},
                               fields, at))
    queues = health.queues
    lines.append(make_line(CLOUD_HEALTH, {"instance": health.instance, "kind": "all"}, {
        "errors": sum(health.errors.values()), "connected": int(health.connected),
        "queue_pending": queues.get("pending", 0), "queue_acks": queues.get("acks", 0),
        "queue_alert_outbox": queues.get("alert_outbox", 0),
        "queue_fl_inbox": sum(v for k, v in queues.items() if k.startswith("fl_inbox")),
    }, at))
    for kind, reasons in sorted(health.refused.items()):
        for reason, count in sorted(reasons.items()):
            lines.append(make_line(CLOUD_REFUSALS, {"instance": health.instance, "kind": kind,
                                                    "reason": reason}, {"count": count}, at))
    return [line for line in lines if line is not None]
