"""AlertEngine: opening, hold times, hysteresis, absence, acknowledge, snapshot/restore."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloud.alerts import AcknowledgeError, AlertEngine, RuleError, SnapshotError, load_rules
from cloud.alerts.rules import Rule, validate_rules
from cloud.storage.sink import AlertEvent
from schemas.base import RuntimeName, Severity
from schemas.device import DeviceTelemetry, ModelMetrics

T0 = 1_700_000_000.0
DEV = "pi-07"


def telemetry(ts: float, device_id: str = DEV, **values: Any) -> DeviceTelemetry:
    fields: dict[str, Any] = {
        "device_id": device_id, "session_id": "s1", "seq": int(ts - T0), "ts": ts,
        "cpu_percent": 10.0, "memory_percent": 20.0, "disk_percent": 30.0, "interval_s": 10.0,
    }
    fields.update(values)
    return DeviceTelemetry(**fields)


def metrics(ts: float, model: str = "digits", version: str = "1.0.0", device_id: str = DEV,
            **values: Any) -> ModelMetrics:
    fields: dict[str, Any] = {
        "device_id": device_id, "model": model, "version": version,
        "runtime": RuntimeName.ONNXRUNTIME, "session_id": "s1", "seq": int(ts - T0), "ts": ts,
        "window_s": 60.0, "sample_count": 100, "throughput_per_s": 5.0,
    }
    fields.update(values)
    return ModelMetrics(**fields)


def rules(*specs: dict[str, Any]) -> list[Rule]:
    return validate_rules(list(specs), "test")


def cpu_rule(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "cpu_high", "kind": "threshold", "source": "telemetry", "field": "cpu_percent",
        "op": ">", "threshold": 90, "severity": "major",
    }
    rule.update(overrides)
    return rule


def latency_rule(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "inference_latency_high", "kind": "threshold", "source": "model_metrics",
        "field": "latency_ms_p95", "op": ">", "threshold": 200, "clear_threshold": 150,
        "severity": "minor",
    }
    rule.update(overrides)
    return rule


SILENT: dict[str, Any] = {"name": "device_silent", "kind": "absence", "intervals": 3,
                          "severity": "critical"}


def transitions(events: list[AlertEvent]) -> list[tuple[str, str, str]]:
    return [(e.transition, e.alert.device_id, e.alert.rule) for e in events]


def test_for_s_opens_exactly_once_after_the_duration() -> None:
    engine = AlertEngine(rules(cpu_rule(for_s=60)), instance="c1")
    for dt in (0, 10, 20, 30, 40, 50):
        assert engine.observe_telemetry(telemetry(T0 + dt, cpu_percent=95.0)) == []
    [event] = engine.observe_telemetry(telemetry(T0 + 60, cpu_percent=97.0), site="lab")
    assert event.transition == "opened"
    assert event.at == T0 + 60
    assert event.site == "lab"
    alert = event.alert
    assert (alert.device_id, alert.rule, alert.severity, alert.state) == (
        DEV, "cpu_high", Severity.MAJOR, "firing")
    assert (alert.metric, alert.value, alert.threshold) == ("telemetry.cpu_percent", 97.0, 90.0)
    assert (alert.opened_at, alert.ts, alert.model, alert.version) == (T0 + 60, T0 + 60, None, None)
    assert alert.message == "telemetry.cpu_percent = 97 (> 90) on pi-07"
    for dt in (70, 80, 90):  # still over the threshold: deduplicated
        assert engine.observe_telemetry(telemetry(T0 + dt, cpu_percent=99.0)) == []
    assert engine.active() == [alert]


def test_for_s_restarts_when_the_breach_is_interrupted() -> None:
    engine = AlertEngine(rules(cpu_rule(for_s=60)), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0))
    engine.observe_telemetry(telemetry(T0 + 30, cpu_percent=50.0))
    engine.observe_telemetry(telemetry(T0 + 40, cpu_percent=95.0))
    assert engine.observe_telemetry(telemetry(T0 + 90, cpu_percent=95.0)) == []
    assert transitions(engine.observe_telemetry(telemetry(T0 + 100, cpu_percent=95.0))) == [
        ("opened", DEV, "cpu_high")]


def test_for_samples_counts_consecutive_samples() -> None:
    engine = AlertEngine(rules(cpu_rule(for_samples=3)), instance="c1")
    assert engine.observe_telemetry(telemetry(T0, cpu_percent=95.0)) == []
    assert engine.observe_telemetry(telemetry(T0 + 1, cpu_percent=95.0)) == []
    assert engine.observe_telemetry(telemetry(T0 + 2, cpu_percent=50.0)) == []  # resets
    assert engine.observe_telemetry(telemetry(T0 + 3, cpu_percent=95.0)) == []
    assert engine.observe_telemetry(telemetry(T0 + 4, cpu_percent=95.0)) == []
    assert transitions(engine.observe_telemetry(telemetry(T0 + 5, cpu_percent=95.0))) == [
        ("opened", DEV, "cpu_high")]


def test_without_hold_opens_on_first_breach_and_devices_are_separate() -> None:
    engine = AlertEngine(rules(cpu_rule()), instance="c1")
    assert engine.observe_telemetry(telemetry(T0, cpu_percent=90.0)) == []  # not > 90
    assert transitions(engine.observe_telemetry(telemetry(T0, "pi-08", cpu_percent=91.0))) == [
        ("opened", "pi-08", "cpu_high")]
    assert [a.device_id for a in engine.active()] == ["pi-08"]


def test_hysteresis() -> None:
    engine = AlertEngine(rules(cpu_rule(clear_threshold=80)), instance="c1")
    [opened] = engine.observe_telemetry(telemetry(T0, cpu_percent=95.0))
    assert engine.observe_telemetry(telemetry(T0 + 10, cpu_percent=85.0)) == []  # above clear
    assert engine.active() == [opened.alert]
    [resolved] = engine.observe_telemetry(telemetry(T0 + 20, cpu_percent=79.0), site="lab")
    assert resolved.transition == "resolved"
    assert resolved.at == T0 + 20
    assert resolved.site == "lab"
    assert resolved.alert == opened.alert
    assert engine.active() == []
    assert transitions(engine.observe_telemetry(telemetry(T0 + 30, cpu_percent=95.0))) == [
        ("opened", DEV, "cpu_high")]


def test_hold_applies_to_opening_only() -> None:
    engine = AlertEngine(rules(cpu_rule(for_samples=2, clear_threshold=80)), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0))
    assert len(engine.observe_telemetry(telemetry(T0 + 1, cpu_percent=95.0))) == 1
    assert transitions(engine.observe_telemetry(telemetry(T0 + 2, cpu_percent=10.0))) == [
        ("resolved", DEV, "cpu_high")]


def test_none_values_neither_open_nor_resolve() -> None:
    rule = cpu_rule(name="hot", field="temperature_c", threshold=75, for_samples=2,
                    severity="critical")
    engine = AlertEngine(rules(rule), instance="c1")
    assert engine.observe_telemetry(telemetry(T0, temperature_c=None)) == []
    engine.observe_telemetry(telemetry(T0 + 1, temperature_c=80.0))
    assert engine.observe_telemetry(telemetry(T0 + 2, temperature_c=None)) == []  # no reset
    [opened] = engine.observe_telemetry(telemetry(T0 + 3, temperature_c=81.0))
    assert opened.alert.severity == Severity.CRITICAL
    assert engine.observe_telemetry(telemetry(T0 + 4, temperature_c=None)) == []
    assert len(engine.active()) == 1


def test_computed_device_error_rate() -> None:
    rule = cpu_rule(name="errors", field="error_rate_percent", threshold=5)
    engine = AlertEngine(rules(rule), instance="c1")
    assert engine.observe_telemetry(telemetry(T0, prediction_count=0, error_count=0)) == []
    [event] = engine.observe_telemetry(telemetry(T0 + 1, prediction_count=100, error_count=6))
    assert (event.alert.metric, event.alert.value) == ("telemetry.error_rate_percent", 6.0)


def test_historical_samples_do_not_open_or_resolve() -> None:
    engine = AlertEngine(rules(cpu_rule(for_samples=2)), instance="c1")
    for dt in (0, 1, 2):
        assert engine.observe_telemetry(
            telemetry(T0 + dt, cpu_percent=99.0, historical=True)) == []
    engine.observe_telemetry(telemetry(T0 + 3, cpu_percent=99.0))
    engine.observe_telemetry(telemetry(T0 + 4, cpu_percent=99.0))
    assert len(engine.active()) == 1
    assert engine.observe_telemetry(telemetry(T0 + 1, cpu_percent=1.0, historical=True)) == []
    assert len(engine.active()) == 1
    model_engine = AlertEngine(rules(latency_rule()), instance="c1")
    assert model_engine.observe_model_metrics(
        metrics(T0, latency_ms_p95=900.0, historical=True)) == []


def test_model_rule_with_models_filter_carries_model_and_version() -> None:
    engine = AlertEngine(rules(latency_rule(models=["digits", "kws"], for_samples=2)),
                         instance="c1")
    assert engine.observe_model_metrics(metrics(T0, "other", latency_ms_p95=900.0)) == []
    assert engine.observe_model_metrics(metrics(T0 + 1, "other", latency_ms_p95=900.0)) == []
    assert engine.observe_model_metrics(metrics(T0, "digits", "1.4.0", latency_ms_p95=250.0)) == []
    [opened] = engine.observe_model_metrics(metrics(T0 + 60, "digits", "1.4.0",
                                                    latency_ms_p95=260.0))
    alert = opened.alert
    assert (alert.model, alert.version, alert.metric, alert.value, alert.severity) == (
        "digits", "1.4.0", "model_metrics.latency_ms_p95", 260.0, Severity.MINOR)
    assert alert.message == (
        "model digits 1.4.0: model_metrics.latency_ms_p95 = 260 (> 200) on pi-07")
    # another model breaching the same rule on the same device: no second alert,
    # and its good values do not resolve the first model's alert
    assert engine.observe_model_metrics(metrics(T0 + 61, "kws", latency_ms_p95=500.0)) == []
    assert engine.observe_model_metrics(metrics(T0 + 62, "kws", latency_ms_p95=500.0)) == []
    assert engine.observe_model_metrics(metrics(T0 + 63, "kws", latency_ms_p95=10.0)) == []
    assert engine.active() == [alert]
    # a None latency (no inferences) neither resolves nor opens
    assert engine.observe_model_metrics(metrics(T0 + 64, "digits", latency_ms_p95=None)) == []
    assert engine.observe_model_metrics(metrics(T0 + 70, "digits", latency_ms_p95=180.0)) == []
    [resolved] = engine.observe_model_metrics(metrics(T0 + 80, "digits", "1.5.0",
                                                      latency_ms_p95=149.0))
    assert resolved.transition == "resolved"
    assert resolved.alert.version == "1.4.0"


def test_second_model_opens_after_the_first_resolves() -> None:
    engine = AlertEngine(rules(latency_rule(for_samples=2)), instance="c1")
    engine.observe_model_metrics(metrics(T0, "digits", latency_ms_p95=300.0))
    engine.observe_model_metrics(metrics(T0 + 1, "digits", latency_ms_p95=300.0))
    engine.observe_model_metrics(metrics(T0 + 2, "kws", latency_ms_p95=300.0))
    engine.observe_model_metrics(metrics(T0 + 3, "kws", latency_ms_p95=300.0))
    engine.observe_model_metrics(metrics(T0 + 4, "digits", latency_ms_p95=100.0))
    assert engine.active() == []
    [opened] = engine.observe_model_metrics(metrics(T0 + 5, "kws", latency_ms_p95=300.0))
    assert opened.alert.model == "kws"


def test_absence_opens_after_n_intervals_and_resolves_on_telemetry() -> None:
    engine = AlertEngine(rules(SILENT), instance="c1")
    assert engine.tick(T0 + 1000) == []  # never seen: never silent
    engine.observe_telemetry(telemetry(T0, interval_s=10.0), site="lab")
    assert engine.tick(T0 + 29) == []
    assert engine.tick(T0 + 30) == []
    [opened] = engine.tick(T0 + 31)
    alert = opened.alert
    assert (opened.transition, opened.at, opened.site) == ("opened", T0 + 31, "lab")
    assert (alert.rule, alert.severity, alert.metric, alert.value, alert.threshold) == (
        "device_silent", Severity.CRITICAL, "telemetry.silence_s", 31.0, 30.0)
    assert alert.message == "no telemetry from pi-07 for 31 s (limit 30 s)"
    assert engine.tick(T0 + 100) == []  # deduplicated
    [resolved] = engine.observe_telemetry(telemetry(T0 + 120))
    assert (resolved.transition, resolved.at, resolved.alert) == ("resolved", T0 + 120, alert)
    assert engine.tick(T0 + 130) == []


def test_absence_uses_the_declared_interval_and_min_silence() -> None:
    silent = SILENT | {"min_silence_s": 60}
    engine = AlertEngine(rules(silent), instance="c1")
    engine.observe_telemetry(telemetry(T0, "fast", interval_s=1.0))
    engine.observe_telemetry(telemetry(T0, "slow", interval_s=60.0))
    assert transitions(engine.tick(T0 + 61)) == [("opened", "fast", "device_silent")]
    assert transitions(engine.tick(T0 + 181)) == [("opened", "slow", "device_silent")]


def test_absence_counts_historical_telemetry_and_received_at() -> None:
    engine = AlertEngine(rules(SILENT), instance="c1")
    engine.observe_telemetry(telemetry(T0))
    [_] = engine.tick(T0 + 60)
    # a replayed sample from after the last one shows the device is back
    assert transitions(engine.observe_telemetry(telemetry(T0 + 5, historical=True))) == [
        ("resolved", DEV, "device_silent")]
    # an older replay is no news
    [_] = engine.tick(T0 + 60)
    assert engine.observe_telemetry(telemetry(T0 + 1, historical=True)) == []
    # with the cloud's receive time, even an old replay proves the device alive
    [event] = engine.observe_telemetry(telemetry(T0 + 2, historical=True), received_at=T0 + 61)
    assert (event.transition, event.at) == ("resolved", T0 + 61)
    assert engine.tick(T0 + 90) == []


def test_resume_forgives_the_clouds_own_outage() -> None:
    engine = AlertEngine(rules(SILENT), instance="c1")
    engine.observe_telemetry(telemetry(T0))
    engine.resume(T0 + 3600)
    assert engine.tick(T0 + 3601) == []
    assert transitions(engine.tick(T0 + 3631)) == [("opened", DEV, "device_silent")]


def test_acknowledge() -> None:
    engine = AlertEngine(rules(cpu_rule(clear_threshold=80)), instance="c1")
    [opened] = engine.observe_telemetry(telemetry(T0, cpu_percent=95.0), site="lab")
    assert engine.acknowledge(DEV, "nope", "alice") is None
    assert engine.acknowledge("pi-99", "cpu_high", "alice") is None
    with pytest.raises(AcknowledgeError, match="acknowledged_by"):
        engine.acknowledge(DEV, "cpu_high", "alice smith")
    event = engine.acknowledge(DEV, "cpu_high", "alice", at=T0 + 5)
    assert event is not None
    assert (event.transition, event.at, event.site) == ("acknowledged", T0 + 5, "lab")
    acked = event.alert
    assert (acked.state, acked.acknowledged_by, acked.ts, acked.opened_at) == (
        "acknowledged", "alice", T0 + 5, T0)
    assert acked.value == opened.alert.value
    assert engine.active() == [acked]  # still active
    assert engine.acknowledge(DEV, "cpu_high", "bob") is None  # already acknowledged
    assert engine.observe_telemetry(telemetry(T0 + 10, cpu_percent=99.0)) == []
    [resolved] = engine.observe_telemetry(telemetry(T0 + 20, cpu_percent=50.0))
    assert resolved.transition == "resolved"
    assert resolved.alert.state == "acknowledged"


def test_acknowledge_defaults_to_the_engines_newest_time() -> None:
    engine = AlertEngine(rules(cpu_rule(), SILENT), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0))
    engine.tick(T0 + 7)
    event = engine.acknowledge(DEV, "cpu_high", "ops")
    assert event is not None
    assert event.at == T0 + 7


def test_forget_device() -> None:
    engine = AlertEngine(rules(cpu_rule(), SILENT), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0))
    engine.observe_telemetry(telemetry(T0, "pi-08", cpu_percent=95.0))
    dropped = engine.forget_device(DEV)
    assert [(a.device_id, a.rule) for a in dropped] == [(DEV, "cpu_high")]
    assert [a.device_id for a in engine.active()] == ["pi-08"]
    assert transitions(engine.tick(T0 + 100)) == [("opened", "pi-08", "device_silent")]


def test_duplicate_rules_are_refused_by_the_engine() -> None:
    rule = rules(cpu_rule())[0]
    with pytest.raises(RuleError, match="'cpu_high': duplicate"):
        AlertEngine([rule, rule], instance="c1")


def _round_trip(engine: AlertEngine) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(engine.snapshot()))
    return data


def test_snapshot_restore_round_trip() -> None:
    specs = (cpu_rule(for_s=60, clear_threshold=80),
             cpu_rule(name="mem", field="memory_percent", clear_threshold=80),
             latency_rule(for_samples=3), SILENT)
    engine = AlertEngine(rules(*specs), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0, memory_percent=95.0), site="lab")
    engine.observe_telemetry(telemetry(T0 + 30, cpu_percent=95.0, memory_percent=95.0))
    engine.observe_model_metrics(metrics(T0 + 30, latency_ms_p95=300.0))
    engine.acknowledge(DEV, "mem", "alice", at=T0 + 31)
    engine.observe_telemetry(telemetry(T0, "pi-08"))
    engine.tick(T0 + 40)  # pi-08 silent
    before = engine.active()
    assert [(a.device_id, a.rule) for a in before] == [(DEV, "mem"), ("pi-08", "device_silent")]

    snapshot = _round_trip(engine)
    restored = AlertEngine.restore(rules(*specs), snapshot, instance="c1")
    assert restored.active() == before
    assert restored.dropped_on_restore == []
    assert _round_trip(restored) == snapshot
    # the half-elapsed for_s timer opens at the right time, not before
    assert restored.observe_telemetry(telemetry(T0 + 50, cpu_percent=95.0,
                                                memory_percent=95.0)) == []
    [opened] = restored.observe_telemetry(telemetry(T0 + 60, cpu_percent=95.0,
                                                    memory_percent=95.0))
    assert (opened.alert.rule, opened.alert.opened_at, opened.site) == ("cpu_high", T0 + 60, "lab")
    # the model counter resumes at 1 of 3
    assert restored.observe_model_metrics(metrics(T0 + 90, latency_ms_p95=300.0)) == []
    assert len(restored.observe_model_metrics(metrics(T0 + 120, latency_ms_p95=300.0))) == 1
    # the open alerts keep resolving and deduplicating
    assert restored.tick(T0 + 85) == []
    assert transitions(restored.observe_telemetry(telemetry(T0 + 130, "pi-08"))) == [
        ("resolved", "pi-08", "device_silent")]
    [resolved] = restored.observe_telemetry(telemetry(T0 + 130, cpu_percent=95.0,
                                                      memory_percent=10.0))
    assert resolved.alert.rule == "mem"
    assert resolved.alert.acknowledged_by == "alice"
    # last-seen times survived: the device is silent after its own interval
    assert transitions(restored.tick(T0 + 161)) == [
        ("opened", DEV, "device_silent"), ("opened", "pi-08", "device_silent")]


def test_restore_drops_removed_rules() -> None:
    engine = AlertEngine(rules(cpu_rule(), cpu_rule(name="mem", field="memory_percent",
                                                    for_samples=5)), instance="c1")
    engine.observe_telemetry(telemetry(T0, cpu_percent=95.0, memory_percent=95.0))
    snapshot = _round_trip(engine)
    restored = AlertEngine.restore(rules(cpu_rule(name="mem", field="memory_percent",
                                                  for_samples=5)), snapshot, instance="c2")
    assert restored.active() == []
    assert [(a.device_id, a.rule) for a in restored.dropped_on_restore] == [(DEV, "cpu_high")]
    assert restored.snapshot()["pending"] == snapshot["pending"]  # mem's counter kept
    # a rule of the same name now watching another metric is another rule
    changed = AlertEngine.restore(rules(cpu_rule(field="disk_percent")), snapshot,
                                  instance="c1")
    assert changed.active() == []
    assert changed.snapshot()["pending"] == []


@pytest.mark.parametrize(
    "snapshot",
    [{}, {"format": 2, "instance": "c1"}, {"instance": "c1", "alerts": [{"rule": "x"}]},
     {"instance": "c1", "devices": [{"device_id": "a b", "last_seen": T0, "interval_s": 10}]}],
)
def test_restore_refuses_malformed_snapshots(snapshot: dict[str, object]) -> None:
    with pytest.raises(SnapshotError):
        AlertEngine.restore(rules(cpu_rule()), snapshot, instance="c1")


def test_restore_refuses_a_non_mapping() -> None:
    with pytest.raises(SnapshotError, match="not a mapping"):
        AlertEngine.restore(rules(cpu_rule()), [1, 2], instance="c1")  # type: ignore[arg-type]


def test_default_rules_end_to_end() -> None:
    engine = AlertEngine(load_rules(), instance="c1")
    engine.observe_telemetry(telemetry(T0, temperature_c=80.0))
    [hot] = engine.observe_telemetry(telemetry(T0 + 10, temperature_c=81.5))
    assert hot.alert.rule == "temperature_high"
    assert hot.alert.message == "pi-07 at 81.5 °C (> 75 °C)"
    for dt in (0, 60, 120):
        events = engine.observe_model_metrics(metrics(T0 + dt, latency_ms_p95=250.0))
    [slow] = events
    assert slow.alert.rule == "inference_latency_high"
    assert slow.alert.message == "digits 1.0.0 p95 latency 250 ms on pi-07 (> 200 ms)"
    [silent] = engine.tick(T0 + 41)  # 3 x 10 s, at least 30 s
    assert silent.alert.rule == "device_silent"
