"""InfluxSink and its line protocol, against a real VictoriaMetrics (``/api/v2/write``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3.exceptions
from influxdb_client.client.write.point import Point
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from broker.launcher import free_port
from cloud.storage import line_protocol as lp
from cloud.storage.influx_sink import InfluxSettings, InfluxSink, error_reason
from cloud.storage.sink import AlertEvent, RolloutEvent, TelemetrySink
from schemas.alerts import Alert, CloudHealth
from schemas.base import RuntimeName, Severity, now
from schemas.device import DeploymentState, DeploymentStatus, DeviceTelemetry, ModelMetrics
from schemas.fl import Fairness, Rejection, TaskState, TaskStatus
from tests.agent_fixtures import wait_until
from tests.examples import EXAMPLES
from tests.victoria import VictoriaMetrics

SinkFactory = Callable[..., InfluxSink]


def telemetry(device_id: str, seq: int, ts: float, **values: Any) -> DeviceTelemetry:
    """A telemetry message with plausible defaults."""
    fields: dict[str, Any] = {"cpu_percent": 10.0 + seq % 90, "memory_percent": 50.0,
                              "disk_percent": 20.0}
    return DeviceTelemetry(device_id=device_id, session_id="s1", seq=seq, ts=ts,
                           **(fields | values))


def model_metrics(device_id: str, ts: float, **values: Any) -> ModelMetrics:
    """A model-metrics message with every optional value set."""
    fields: dict[str, Any] = {
        "model": "digits-mlp", "version": "1.2.0", "runtime": RuntimeName.ONNXRUNTIME,
        "session_id": "s1", "seq": 7, "window_s": 60.0, "sample_count": 500,
        "latency_ms_mean": 0.031, "latency_ms_p50": 0.025, "latency_ms_p95": 0.06,
        "latency_ms_p99": 0.1, "throughput_per_s": 8.3, "memory_mb": 4.5, "cpu_percent": 2.0,
        "error_count": 1, "error_rate_percent": 0.2, "accuracy": 0.97,
    }
    return ModelMetrics(device_id=device_id, ts=ts, **(fields | values))


def alert(device_id: str, ts: float, **values: Any) -> Alert:
    """An alert as the rule engine publishes it."""
    fields: dict[str, Any] = {"rule": "cpu_high", "severity": Severity.MAJOR,
                              "metric": "telemetry.cpu_percent", "value": 95.0,
                              "threshold": 90.0, "message": "CPU above 90 %"}
    return Alert(device_id=device_id, opened_at=ts, ts=ts, **(fields | values))


def task_status(task: str, ts: float, **values: Any) -> TaskStatus:
    """A task status with every round value set."""
    fields: dict[str, Any] = {
        "state": TaskState.EVALUATING, "round": 4, "rounds_total": 30,
        "participants": ["d1", "d2", "d3"],
        "rejected": [Rejection(device_id="d4", reason="non_finite")],
        "train_loss": 0.4, "eval_loss": 0.35, "eval_accuracy": 0.9, "central_accuracy": 0.91,
        "fairness": Fairness(mean=0.9, std=0.02, cv=0.022, disparity=0.05),
        "bytes_received": 123_456, "duration_s": 3.2, "epsilon_spent": 1.5,
    }
    return TaskStatus(task=task, ts=ts, **(fields | values))


def parse_simple_line(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """Split a line without escaped characters into measurement, tags, fields, timestamp."""
    head, field_text, ts = line.split(" ")
    measurement, *tag_items = head.split(",")
    tags = dict(item.split("=", 1) for item in tag_items)
    fields = dict(item.split("=", 1) for item in field_text.split(","))
    return measurement, tags, fields, int(ts)


def values_by_metric(series: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Exported series -> metric name -> values, in time order."""
    out: dict[str, list[float]] = {}
    for item in series:
        pairs = sorted(zip(item["timestamps"], item["values"], strict=True))
        out.setdefault(item["metric"]["__name__"], []).extend(v for _, v in pairs)
    return out


# -- line protocol ------------------------------------------------------------------------


def test_escaping_of_names_tags_and_strings() -> None:
    assert lp.escape_measurement("cpu load,x=1") == r"cpu\ load\,x=1"
    assert lp.escape_key("a b,c=d") == r"a\ b\,c\=d"
    assert lp.escape_tag_value("line\nbreak") == r"line\nbreak"
    assert lp.escape_tag_value("ends\\") == "ends\\ "
    assert lp.format_string_field('say "hi" \\ bye') == r'"say \"hi\" \\ bye"'
    line = lp.make_line("m x", {"t k": "v,1=2"}, {"f=k": 'q"'}, 5)
    assert line == r'm\ x,t\ k=v\,1\=2 f\=k="q\"" 5'


@pytest.mark.parametrize(("tags", "fields"), [
    ({"host": "a b", "region": "eu,west"}, {"load": 3}),
    ({"k=ey": "val=ue"}, {"text": 'a "quoted" \\ path'}),
    ({"z": "1", "a": "2"}, {"flag": True}),
    ({"t": "tab\there"}, {"f k": False}),
])
def test_lines_match_influxdb_client_serializer(tags: dict[str, str],
                                                 fields: dict[str, Any]) -> None:
    # influxdb-client is untyped
    point = Point("my measurement").time(1000)  # type: ignore[no-untyped-call]
    for key, value in tags.items():
        point.tag(key, value)
    for key, value in fields.items():
        point.field(key, value)
    assert lp.make_line("my measurement", tags, fields, 1000) == point.to_line_protocol()


def test_field_types_and_omissions() -> None:
    line = lp.make_line("m", {"a": "1", "empty": "", "none": None},
                        {"i": 3, "f": 0.5, "whole": 2.0, "tiny": 1e-7, "b": True, "off": False,
                         "s": "x", "missing": None, "nan": math.nan, "inf": math.inf})
    assert line == 'm,a=1 i=3i,f=0.5,whole=2.0,tiny=1e-07,b=true,off=false,s="x"'
    assert lp.make_line("m", {"a": "1"}, {"missing": None, "nan": math.nan}, 1) is None
    with pytest.raises(TypeError, match="bytes"):
        lp.format_field_value(b"x")  # type: ignore[arg-type]


def test_tags_are_sorted_and_timestamp_follows_precision() -> None:
    assert lp.make_line("m", {"b": "2", "a": "1"}, {"f": 1}, 7) == "m,a=1,b=2 f=1i 7"
    ts = 1_790_000_000.123456
    assert lp.timestamp(ts, "s") == 1_790_000_000
    assert lp.timestamp(ts, "ms") == 1_790_000_000_123
    assert lp.timestamp(ts, "us") == 1_790_000_000_123_456
    assert abs(lp.timestamp(ts, "ns") - 1_790_000_000_123_456_000) < 1000


def test_telemetry_line_writes_ints_flags_and_omits_unknown_values() -> None:
    msg = telemetry("pi-01", 42, 1_790_000_000.5, prediction_count=120, error_count=3,
                    battery_plugged=True, historical=True, temperature_c=None)
    measurement, tags, fields, ts = parse_simple_line(
        lp.telemetry_line(msg, "plant-a") or "")
    assert measurement == "device_telemetry"
    assert tags == {"device_id": "pi-01", "site": "plant-a"}
    assert ts == 1_790_000_000_500
    assert fields["seq"] == "42i"
    assert fields["prediction_count"] == "120i"
    assert fields["battery_plugged"] == "1i"
    assert fields["historical"] == "1i"
    assert fields["cpu_percent"] == "52.0"
    assert fields["error_rate_percent"] == "2.5"
    assert "temperature_c" not in fields
    assert "battery_percent" not in fields
    assert "site" not in parse_simple_line(lp.telemetry_line(msg) or "")[1]


def test_builders_write_exactly_the_schema() -> None:
    ts = now()
    full_telemetry = telemetry("d", 1, ts, temperature_c=50.0, battery_percent=80.0,
                               battery_plugged=False, network_latency_ms=3.0, uptime_s=9.0)
    events = {
        "device_telemetry": lp.telemetry_line(full_telemetry, "site-a"),
        "model_metrics": lp.model_metrics_line(model_metrics("d", ts), "site-a"),
        "alerts": lp.alert_event_line(AlertEvent(alert("d", ts), "opened", ts, "site-a")),
        "fl_rounds": lp.fl_round_line(task_status("t", ts)),
        "deployment_status": lp.deployment_status_line(DeploymentStatus(
            device_id="d", model="m", ts=ts, state=DeploymentState.INSTALLED,
            active_version="1.0", chunks_received=3, chunks_total=3)),
        "rollout_events": lp.rollout_event_line(RolloutEvent(
            rollout=3, model="m", version="1.1.0", event="aborted", at=ts, stage=0,
            targets=2, installed=1, failed=1, detail="alert_cpu_high_on_d")),
    }
    health_lines = lp.cloud_health_lines(EXAMPLES[CloudHealth])  # type: ignore[arg-type]
    written: dict[str, tuple[set[str], set[str]]] = {}
    for health_line in health_lines:
        health_measurement, health_tags, health_fields, _ = parse_simple_line(health_line)
        known = written.setdefault(health_measurement, (set(), set()))
        known[0].update(health_tags)
        known[1].update(health_fields)
    assert set(events) | set(written) == set(lp.SCHEMA)
    for name, line in events.items():
        measurement, tags, fields, _ = parse_simple_line(line or "")
        assert measurement == name
        assert (frozenset(tags), frozenset(fields)) == lp.SCHEMA[name], name
    for name, (tag_keys, field_keys) in written.items():  # per kind, and one with the totals
        assert (frozenset(tag_keys), frozenset(field_keys)) == lp.SCHEMA[name], name


def test_alert_transitions_and_string_fields() -> None:
    ts = 1_790_000_000.0
    opened = lp.alert_event_line(AlertEvent(alert("d", ts), "opened", ts + 1))
    acked = lp.alert_event_line(AlertEvent(
        alert("d", ts, state="acknowledged", acknowledged_by="ops"), "acknowledged", ts + 2))
    resolved = lp.alert_event_line(AlertEvent(
        alert("d", ts, state="acknowledged"), "resolved", ts + 3))
    parsed = [parse_simple_line(line or "") for line in (opened, acked, resolved)]
    assert [(f["active"], f["acknowledged"], f["transition"]) for _, _, f, _ in parsed] == [
        ("1i", "0i", '"opened"'), ("1i", "1i", '"acknowledged"'), ("0i", "1i", '"resolved"')]
    assert [t for *_, t in parsed] == [1_790_000_001_000, 1_790_000_002_000, 1_790_000_003_000]
    assert parsed[0][1] == {"device_id": "d", "rule": "cpu_high", "severity": "major"}


def test_deployment_status_without_values_is_skipped() -> None:
    status = DeploymentStatus(device_id="d", model="m", ts=now(), state=DeploymentState.IDLE)
    assert lp.deployment_status_line(status) is None


def test_error_reasons() -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
    assert error_reason(refused) == "connection"
    unavailable = ApiException(status=503)  # type: ignore[no-untyped-call]
    assert error_reason(unavailable) == "http_503"
    ssl_failure = ApiException(status=0, reason="ssl")  # type: ignore[no-untyped-call]
    assert error_reason(ssl_failure) == "api_error"
    read_timeout = urllib3.exceptions.ReadTimeoutError(None, "/", "slow")  # type: ignore[arg-type]
    assert error_reason(read_timeout) == "timeout"
    assert error_reason(TimeoutError()) == "timeout"
    assert error_reason(ConnectionResetError()) == "connection"
    assert error_reason(OSError("disk")) == "os_error"


# -- against VictoriaMetrics --------------------------------------------------------------


@pytest.fixture
def make_sink() -> Iterator[SinkFactory]:
    """Builds sinks (closed after the test); ``url`` and settings may be overridden."""
    sinks: list[InfluxSink] = []

    def factory(url: str, *, sleep: Callable[[float], None] = time.sleep,
                **overrides: Any) -> InfluxSink:
        values: dict[str, Any] = {"url": url, "token": SecretStr("test-token"),
                                  "org": "edgefl", "bucket": "telemetry"}
        sink = InfluxSink(InfluxSettings(**(values | overrides)), sleep=sleep)
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.close()


def test_sink_satisfies_the_protocol(victoria: VictoriaMetrics,
                                     make_sink: SinkFactory) -> None:
    sink: TelemetrySink = make_sink(victoria.url)
    sink.flush()
    assert sink.stats().written == 0


def test_telemetry_is_written_and_read_back(victoria: VictoriaMetrics,
                                            make_sink: SinkFactory,
                                            unique_id: Callable[[str], str]) -> None:
    device, other = unique_id("dev"), unique_id("dev")
    t0 = round(now(), 3)
    errors_before = victoria.metric("vm_log_messages_total", level="error")
    sink = make_sink(victoria.url)
    sink.write_telemetry([
        telemetry(device, 0, t0, temperature_c=51.5, battery_plugged=True),
        telemetry(device, 1, t0 + 1, prediction_count=10, error_count=1),
        telemetry(other, 0, t0),
    ], sites={device: "plant-a"})
    sink.flush()
    assert sink.stats().written == 3
    assert sink.stats().buffered == 0
    assert sink.healthy()

    series = victoria.wait_export("device_telemetry_.*", points=20, device_id=device)
    assert {s["metric"]["site"] for s in series} == {"plant-a"}
    values = values_by_metric(series)
    assert values["device_telemetry_cpu_percent"] == [10.0, 11.0]
    assert values["device_telemetry_seq"] == [0, 1]
    assert values["device_telemetry_temperature_c"] == [51.5]
    assert values["device_telemetry_battery_plugged"] == [1]
    assert values["device_telemetry_historical"] == [0, 0]
    assert values["device_telemetry_error_rate_percent"] == [0.0, 10.0]
    assert "device_telemetry_battery_percent" not in values
    assert min(series[0]["timestamps"]) == round(t0 * 1000)
    assert set(values) <= {f"device_telemetry_{f}" for f in lp.SCHEMA["device_telemetry"][1]}
    other_series = victoria.wait_export("device_telemetry_cpu_percent", points=1,
                                        device_id=other)
    assert "site" not in other_series[0]["metric"]
    assert victoria.metric("vm_log_messages_total", level="error") == errors_before


def test_model_metrics_alerts_rounds_and_deployments_are_written(
        victoria: VictoriaMetrics, make_sink: SinkFactory,
        unique_id: Callable[[str], str]) -> None:
    device, task = unique_id("dev"), unique_id("task")
    t0 = round(now(), 3)
    sink = make_sink(victoria.url)
    sink.write_model_metrics([model_metrics(device, t0)], sites={device: "plant-b"})
    firing = alert(device, t0)
    sink.write_alert_events([
        AlertEvent(firing, "opened", t0, "plant-b"),
        AlertEvent(firing.model_copy(update={"state": "acknowledged"}), "acknowledged",
                   t0 + 1, "plant-b"),
        AlertEvent(firing.model_copy(update={"state": "acknowledged"}), "resolved", t0 + 2,
                   "plant-b"),
    ])
    sink.write_fl_round(task_status(task, t0))
    sink.write_deployment_status([DeploymentStatus(
        device_id=device, model="digits-mlp", ts=t0, state=DeploymentState.DOWNLOADING,
        target_version="1.3.0", chunks_received=2, chunks_total=5)])
    sink.write_rollout_event(RolloutEvent(
        rollout=7, model=task, version="1.3.0", event="stage", at=t0, stage=1, targets=5,
        installed=2, failed=0))
    sink.flush()
    assert sink.stats().written == 7

    metrics = victoria.wait_export("model_metrics_.*", points=12, device_id=device)
    assert metrics[0]["metric"] | {"__name__": ""} == {
        "__name__": "", "device_id": device, "model": "digits-mlp", "version": "1.2.0",
        "runtime": "onnxruntime", "site": "plant-b"}
    values = values_by_metric(metrics)
    assert values["model_metrics_latency_ms_p95"] == [0.06]
    assert values["model_metrics_sample_count"] == [500]
    assert values["model_metrics_accuracy"] == [0.97]

    alerts = values_by_metric(victoria.wait_export("alerts_.*", points=15, device_id=device))
    assert alerts["alerts_active"] == [1, 1, 0]
    assert alerts["alerts_acknowledged"] == [0, 1, 1]
    assert alerts["alerts_value"] == [95.0, 95.0, 95.0]
    assert alerts["alerts_transition"] == [0, 0, 0]  # strings are stored as 0 by VM

    rounds = victoria.wait_export("fl_rounds_.*", points=14, task=task)
    assert {s["metric"]["task"] for s in rounds} == {task}
    fl = values_by_metric(rounds)
    assert fl["fl_rounds_round"] == [4]
    assert fl["fl_rounds_participants"] == [3]
    assert fl["fl_rounds_rejected"] == [1]
    assert fl["fl_rounds_fairness_disparity"] == [0.05]
    assert fl["fl_rounds_bytes_received"] == [123_456]
    assert fl["fl_rounds_epsilon_spent"] == [1.5]

    deploy = victoria.wait_export("deployment_status_.*", points=2, device_id=device)
    assert {s["metric"]["state"] for s in deploy} == {"downloading"}
    assert values_by_metric(deploy)["deployment_status_chunks_received"] == [2]

    rollout = victoria.wait_export("rollout_events_.*", points=5, model=task)
    assert {s["metric"]["event"] for s in rollout} == {"stage"}
    steps = values_by_metric(rollout)
    assert steps["rollout_events_rollout"] == [7]
    assert steps["rollout_events_targets"] == [5]
    assert steps["rollout_events_installed"] == [2]


def test_flush_sends_batches_of_batch_size(own_victoria: VictoriaMetrics,
                                           make_sink: SinkFactory,
                                           unique_id: Callable[[str], str]) -> None:
    device = unique_id("dev")
    t0 = round(now(), 3) - 2000
    sink = make_sink(own_victoria.url, batch_size=100)
    sink.write_telemetry([telemetry(device, i, t0 + i) for i in range(1050)])
    sink.flush()
    assert sink.stats().written == 1050
    series = own_victoria.wait_export("device_telemetry_seq", points=1050, device_id=device)
    assert values_by_metric(series)["device_telemetry_seq"] == list(range(1050))
    # the server's own counters refresh once a second; on a fresh server, any non-zero
    # value was taken after the flush
    wait_until(lambda: own_victoria.metric("vm_http_requests_total",
                                           path="/influx/write") > 0, what="server counters")
    requests = own_victoria.metric("vm_http_requests_total", path="/influx/write")
    assert requests == 11


def test_buffer_is_bounded_and_drops_the_oldest(victoria: VictoriaMetrics,
                                                make_sink: SinkFactory,
                                                unique_id: Callable[[str], str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    device = unique_id("dev")
    t0 = round(now(), 3) - 100
    sink = make_sink(victoria.url, max_buffer_points=10)
    sink.write_telemetry([telemetry(device, i, t0 + i) for i in range(20)])
    sink.write_telemetry([telemetry(device, i, t0 + i) for i in range(20, 25)])
    stats = sink.stats()
    assert (stats.dropped, stats.buffered) == (15, 10)
    assert [parse_simple_line(line)[2]["seq"] for line in sink.pending_lines()] == [
        f"{i}i" for i in range(15, 25)]
    assert "dropped the oldest" in caplog.text
    assert not sink.healthy()
    assert sink.healthy(), "healthy again once the drop was seen and nothing new was dropped"
    sink.flush()
    series = victoria.wait_export("device_telemetry_seq", points=10, device_id=device)
    assert values_by_metric(series)["device_telemetry_seq"] == list(range(15, 25))


def test_server_down_keeps_lines_and_a_live_sink_writes_them(
        victoria: VictoriaMetrics, make_sink: SinkFactory,
        unique_id: Callable[[str], str]) -> None:
    device = unique_id("dev")
    t0 = round(now(), 3) - 100
    waits: list[float] = []

    def short_sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    dead = make_sink(f"http://127.0.0.1:{free_port()}", sleep=short_sleep, batch_size=4,
                     retries=3, retry_base_s=0.01, retry_max_s=0.03)
    dead.write_telemetry([telemetry(device, i, t0 + i) for i in range(10)])
    lines = dead.pending_lines()
    dead.flush()

    stats = dead.stats()
    assert stats.written == 0
    assert stats.failed_batches == 1, "the flush stops at the first batch that fails"
    assert stats.retried == 3
    assert stats.errors == {"connection": 4}
    assert stats.buffered == 10
    assert dead.pending_lines() == lines, "kept in their original order"
    assert not dead.healthy()
    assert len(waits) == 3
    assert all(0.005 <= w <= 0.03 for w in waits)
    assert waits[2] >= waits[0], "exponential (capped) with jitter in [50 %, 100 %]"

    live = make_sink(victoria.url)
    live.write_lines(dead.pending_lines())
    live.flush()
    assert live.stats().written == 10
    series = victoria.wait_export("device_telemetry_seq", points=10, device_id=device)
    assert values_by_metric(series)["device_telemetry_seq"] == list(range(10))


def test_outage_and_recovery_with_the_same_sink(own_victoria: VictoriaMetrics,
                                                make_sink: SinkFactory,
                                                unique_id: Callable[[str], str]) -> None:
    device = unique_id("dev")
    t0 = round(now(), 3) - 100
    sink = make_sink(own_victoria.url, retries=1, retry_base_s=0.01, retry_max_s=0.01)
    sink.write_telemetry([telemetry(device, 0, t0)])
    sink.flush()
    assert sink.healthy()

    own_victoria.stop()
    sink.write_telemetry([telemetry(device, i, t0 + i) for i in range(1, 6)])
    sink.flush()
    assert not sink.healthy()
    assert sink.stats().buffered == 5
    assert not sink.healthy(), "stays unhealthy until a flush succeeds"

    own_victoria.restart()
    sink.flush()
    assert sink.healthy()
    stats = sink.stats()
    assert (stats.written, stats.buffered, stats.failed_batches) == (6, 0, 1)
    series = own_victoria.wait_export("device_telemetry_seq", points=6, device_id=device)
    assert values_by_metric(series)["device_telemetry_seq"] == list(range(6))


def test_close_flushes_and_refuses_later_writes(victoria: VictoriaMetrics,
                                                make_sink: SinkFactory,
                                                unique_id: Callable[[str], str]) -> None:
    device = unique_id("dev")
    sink = make_sink(victoria.url)
    sink.write_telemetry([telemetry(device, 0, round(now(), 3))])
    sink.close()
    assert sink.stats().written == 1
    victoria.wait_export("device_telemetry_seq", points=1, device_id=device)
    with pytest.raises(RuntimeError, match="closed"):
        sink.write_telemetry([telemetry(device, 1, now())])
    sink.close()  # idempotent
