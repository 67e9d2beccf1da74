"""Device reports from the cloud's store: statistics, models, alerts, recommendations.

Uptime comes from the device's actual online intervals (births to deaths), not
a fixed 24 h guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.storage.sqlite_store import SqliteStore
from schemas.base import now


@dataclass
class ModelReport:
    """One model's statistics on one device over the period."""

    model: str
    versions: list[str]
    samples: int
    latency_ms_mean: float | None
    latency_ms_p95: float | None
    throughput_per_s: float | None
    memory_mb: float | None
    cpu_percent: float | None
    error_rate_percent: float | None
    accuracy: float | None


@dataclass
class DeviceReport:
    """The seed's device statistics, computed from stored messages."""

    device_id: str
    since: float
    until: float
    uptime_s: float
    uptime_percent: float
    observed_s: float
    """The part of the period since the device was first seen (uptime is a share of it)."""
    telemetry_messages: int
    cpu_percent_avg: float | None
    cpu_percent_max: float | None
    memory_percent_avg: float | None
    memory_percent_max: float | None
    temperature_c_avg: float | None
    temperature_c_max: float | None
    predictions: int
    errors: int
    error_rate_percent: float
    models: list[ModelReport] = field(default_factory=list)
    alerts: list[dict[str, object]] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)


def _uptime(store: SqliteStore, device_id: str, since: float, until: float) -> float:
    total = 0.0
    for row in store.query("SELECT online_at, offline_at FROM device_sessions "
                           "WHERE device_id=? AND online_at < ? AND "
                           "(offline_at IS NULL OR offline_at > ?)",
                           (device_id, until, since)):
        start = max(since, row["online_at"])
        end = min(until, row["offline_at"] if row["offline_at"] is not None else min(until,
                                                                                  now()))
        total += max(0.0, end - start)
    return total


def device_report(store: SqliteStore, device_id: str, since: float, until: float,
                  ) -> DeviceReport:
    """Compute the report of one device for [since, until)."""
    t = store.query(
        "SELECT COUNT(*) n, AVG(cpu_percent) cpu_avg, MAX(cpu_percent) cpu_max, "
        "AVG(memory_percent) mem_avg, MAX(memory_percent) mem_max, AVG(temperature_c) t_avg, "
        "MAX(temperature_c) t_max, COALESCE(SUM(prediction_count), 0) predictions, "
        "COALESCE(SUM(error_count), 0) errors FROM telemetry "
        "WHERE device_id=? AND ts >= ? AND ts < ?", (device_id, since, until))[0]
    predictions, errors = int(t["predictions"]), int(t["errors"])
    uptime = _uptime(store, device_id, since, until)
    first = store.query(
        "SELECT MIN(t) first FROM (SELECT MIN(online_at) t FROM device_sessions WHERE "
        "device_id=? UNION ALL SELECT MIN(ts) t FROM telemetry WHERE device_id=?)",
        (device_id, device_id))[0]["first"]
    observed = max(0.0, min(until, now()) - max(since, first if first is not None else until))
    report = DeviceReport(
        device_id=device_id, since=since, until=until, uptime_s=uptime,
        uptime_percent=min(100.0, 100.0 * uptime / observed) if observed > 0 else 0.0,
        observed_s=observed,
        telemetry_messages=int(t["n"]), cpu_percent_avg=t["cpu_avg"], cpu_percent_max=t["cpu_max"],
        memory_percent_avg=t["mem_avg"], memory_percent_max=t["mem_max"],
        temperature_c_avg=t["t_avg"], temperature_c_max=t["t_max"], predictions=predictions,
        errors=errors, error_rate_percent=100.0 * errors / predictions if predictions else 0.0,
    )
    for m in store.query(
        # interval_count: calls since the previous metrics message, which add up;
        # sample_count is per sliding window, and consecutive windows overlap.
        "SELECT model, GROUP_CONCAT(DISTINCT version) versions, "
        "COALESCE(SUM(interval_count), 0) samples, "
        "SUM(latency_ms_mean * interval_count) / NULLIF(SUM(CASE WHEN latency_ms_mean IS NOT "
        "NULL THEN interval_count END), 0) lat_mean, MAX(latency_ms_p95) lat_p95, "
        "AVG(throughput_per_s) thr, AVG(memory_mb) mem, AVG(cpu_percent) cpu, "
        "100.0 * SUM(interval_errors) / NULLIF(SUM(interval_count), 0) err, AVG(accuracy) acc "
        "FROM model_metrics WHERE device_id=? AND ts >= ? AND ts < ? GROUP BY model",
        (device_id, since, until),
    ):
        report.models.append(ModelReport(
            model=m["model"], versions=sorted(str(m["versions"]).split(",")),
            samples=int(m["samples"] or 0), latency_ms_mean=m["lat_mean"],
            latency_ms_p95=m["lat_p95"], throughput_per_s=m["thr"], memory_mb=m["mem"],
            cpu_percent=m["cpu"], error_rate_percent=m["err"], accuracy=m["acc"]))
    report.alerts = [dict(row) for row in store.query(
        "SELECT rule, severity, message, opened_at, resolved, resolved_at, acknowledged_by "
        "FROM alerts WHERE device_id=? AND opened_at < ? AND (resolved_at IS NULL OR "
        "resolved_at >= ?) ORDER BY opened_at", (device_id, until, since))]
    report.recommendations = recommendations(report)
    return report


def recommendations(report: DeviceReport) -> list[str]:
    """What an operator might do about what the report shows."""
    advice = []
    if report.telemetry_messages == 0:
        return ["no telemetry in this period: check that the device is provisioned and online"]
    if (report.cpu_percent_avg or 0) > 80:
        advice.append("CPU is high on average: consider an int8 or smaller model, or a lower "
                      "inference rate")
    if (report.memory_percent_max or 0) > 90:
        advice.append("memory peaked above 90 %: check for leaks or reduce the model size")
    if (report.temperature_c_max or 0) > 75:
        advice.append("temperature exceeded 75 °C: check cooling or throttle the workload")
    if report.error_rate_percent > 5:
        advice.append("inference error rate above 5 %: inspect inputs and consider a rollback")
    if report.uptime_percent < 90:
        advice.append(f"online only {report.uptime_percent:.0f} % of the period: check power "
                      "and network")
    for model in report.models:
        if (model.latency_ms_p95 or 0) > 200:
            advice.append(f"{model.model}: p95 latency above 200 ms: try a faster runtime or "
                          "quantization")
        if model.accuracy is not None and model.accuracy < 0.8:
            advice.append(f"{model.model}: accuracy {model.accuracy:.0%} on labelled feedback: "
                          "retrain (federated) or roll back")
    return advice or ["no action needed"]
