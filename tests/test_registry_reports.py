"""Device sessions, reports and the silent-device rule, against the real broker."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.base import now
from schemas.device import DeviceState, ModelMetrics
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory, RunningCloud
from tests.conftest import RunningBroker
from tests.test_cloud_service import HW, Device, stored

pytestmark = pytest.mark.integration


def report(cloud: RunningCloud, device_id: str, since: str = "24h") -> dict[str, object]:
    from edgefl.cli import build_app

    app = build_app()
    result = CliRunner().invoke(app, ["report", device_id, "--since", since, "--data-dir",
                                      str(cloud.settings.data_dir), "--json"])
    assert result.exit_code == 0, result.output
    body: dict[str, object] = json.loads(result.output)
    return body


def birth(device: Device, bd_seq: int, ts: float) -> None:
    state = DeviceState.model_validate({
        "device_id": device.id, "state": "online", "bd_seq": bd_seq, "ts": ts,
        "agent_version": "t", "hardware": HW, "reason": "birth"})
    assert device.client.publish(device.topics.device_state(device.id), state.to_json(),
                                 retain=True) in (0, 0x10)


def test_a_new_birth_ends_the_open_session_and_uptime_never_exceeds_the_period(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    start = now() - 200  # (a live birth is accepted within the 300 s skew allowance)
    birth(device, 0, start)  # its death never arrived (the broker lost the will)
    birth(device, 1, start + 100)
    device.telemetry()
    wait_until(lambda: len(cloud.rows("SELECT 1 FROM device_sessions WHERE device_id=?",
                                      (device.id,))) == 2, what="two sessions")
    wait_until(lambda: stored(cloud, device.id) == [0], what="telemetry stored")
    sessions = cloud.rows("SELECT bd_seq, online_at, offline_at FROM device_sessions "
                          "WHERE device_id=? ORDER BY bd_seq", (device.id,))
    assert sessions[0]["offline_at"] == pytest.approx(start + 100)
    assert sessions[1]["offline_at"] is None
    body = report(cloud, device.id, since="1h")
    assert body["uptime_s"] == pytest.approx(200, abs=5)
    assert body["uptime_percent"] == pytest.approx(100, abs=1)
    device.client.close()


def test_uptime_of_a_device_first_seen_minutes_ago_is_a_share_of_what_was_observed(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    birth(device, 0, now() - 240)
    device.telemetry()
    wait_until(lambda: stored(cloud, device.id) == [0], what="telemetry stored")
    body = report(cloud, device.id, since="24h")
    assert body["observed_s"] == pytest.approx(240, abs=5)
    assert body["uptime_percent"] == pytest.approx(100, abs=2)  # not 240 s of 24 h
    device.client.close()


def test_model_samples_add_up_intervals_not_overlapping_windows(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    session = uuid.uuid4().hex[:8]
    for seq in range(3):  # a 60 s window reported every 20 s: each window holds 90 calls
        metrics = ModelMetrics(device_id=device.id, model="m", version="1",
                               runtime="onnxruntime", session_id=session, seq=seq, ts=now(),
                               window_s=60.0, sample_count=90, throughput_per_s=1.5,
                               latency_ms_mean=1.0, interval_count=30, interval_errors=seq)
        assert device.client.publish(topics.model_metrics(device.id, "m"),
                                     metrics.to_json()) in (0, 0x10)
    wait_until(lambda: len(cloud.rows("SELECT 1 FROM model_metrics WHERE device_id=?",
                                      (device.id,))) == 3, what="metrics stored")
    device.telemetry()
    wait_until(lambda: stored(cloud, device.id) == [0], what="telemetry stored")
    models = report(cloud, device.id)["models"]
    assert isinstance(models, list) and len(models) == 1
    model: dict[str, Any] = models[0]
    assert model["samples"] == 90
    assert model["error_rate_percent"] == pytest.approx(100 * 3 / 90)
    device.client.close()


def test_a_report_on_an_unknown_device_says_so_and_devices_show_dates(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    from edgefl.cli import build_app

    app = build_app()
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    device.telemetry()
    wait_until(lambda: stored(cloud, device.id) == [0], what="stored")
    data = str(cloud.settings.data_dir)
    unknown = CliRunner().invoke(app, ["report", "no-such-device", "--data-dir", data])
    assert unknown.exit_code == 1
    assert "no such device 'no-such-device'" in unknown.output
    listing = CliRunner().invoke(app, ["devices", "--data-dir", data],
                                 env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", listing.output), listing.output
    device.client.close()


def test_a_clean_stop_is_not_a_silent_device_but_an_ungraceful_death_is(
    make_cloud: CloudFactory, make_agent: AgentFactory, tmp_path: Path,
) -> None:
    rules = tmp_path / "silent.yaml"
    rules.write_text("rules:\n  - name: device_silent\n    kind: absence\n    intervals: 10\n"
                     "    severity: critical\n")
    cloud = make_cloud(alerts={"rules_file": rules})
    alerts = cloud.service.alerts
    clean = make_agent(interval_s=0.1)
    crashed = make_agent(interval_s=0.1)
    for agent in (clean, crashed):
        wait_until(lambda a=agent: bool(stored(cloud, a.device_id)),  # type: ignore[misc]
                   what="reporting")
    clean.stop()  # retained offline with reason shutdown
    crashed._stop.set()
    crashed.session._stop.set()
    crashed.session.drop()  # ...and the broker sends its will (reason lwt)
    wait_until(lambda: ("device_silent" in {a.rule for a in alerts.engine.active()
                                            if a.device_id == crashed.device_id}),
               timeout=15, what="the crashed device alerted as silent")
    ticks = alerts.ticks
    wait_until(lambda: alerts.ticks >= ticks + 5, what="more absence checks")
    assert not [a for a in alerts.engine.active() if a.device_id == clean.device_id]
