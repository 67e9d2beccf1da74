"""The cloud service against the real Mosquitto: ingest, storage, registry, alerts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.alerts import Alert
from schemas.base import decode_message, now
from schemas.device import DeviceState, HardwareInfo
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory, RunningCloud
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

pytestmark = pytest.mark.integration
HW = HardwareInfo(platform="Linux", machine="aarch64", cpu_count=4, memory_total_mb=2048.0)


class Device:
    """A hand-driven device: exact control over what it publishes."""

    def __init__(self, broker: RunningBroker, topics: Topics, device_id: str) -> None:
        self.id = device_id
        self.topics = topics
        self.session = uuid.uuid4().hex[:8]
        self.seq = 0
        self.client = broker.connected(device_id)

    def telemetry(self, **values: Any) -> bytes:
        body = {"device_id": self.id, "session_id": self.session, "seq": self.seq,
                "ts": now(), "cpu_percent": 10.0, "memory_percent": 20.0, "disk_percent": 30.0,
                "interval_s": 0.2} | values
        self.seq += 1
        payload = json.dumps(body).encode()
        assert self.client.publish(self.topics.telemetry(self.id), payload) in (0, 0x10)
        return payload

    def state(self, state: str, bd_seq: int) -> None:
        message = DeviceState.model_validate({
            "device_id": self.id, "state": state, "bd_seq": bd_seq, "ts": now(),
            "agent_version": "t", "hardware": HW,
            "reason": "birth" if state == "online" else "lwt"})
        assert self.client.publish(self.topics.device_state(self.id), message.to_json(),
                                   retain=True) in (0, 0x10)


def stored(cloud: RunningCloud, device_id: str) -> list[int]:
    """Stored telemetry seqs of a device."""
    return [r["seq"] for r in cloud.rows(
        "SELECT seq FROM telemetry WHERE device_id=? ORDER BY seq", (device_id,))]


def test_fleet_telemetry_lands_in_sqlite_exactly_once(make_cloud: CloudFactory,
                                                      make_agent: AgentFactory,
                                                      mosquitto: RunningBroker,
                                                      topics: Topics,
                                                      new_device_id: Callable[[], str]) -> None:
    cloud = make_cloud()
    agents = [make_agent(interval_s=0.1) for _ in range(3)]
    for agent in agents:
        wait_until(lambda a=agent: len(stored(cloud, a.device_id)) >= 5,  # type: ignore[misc]
                   what=f"telemetry of {agent.device_id} stored")
        assert cloud.service.registry.get(agent.device_id).online  # type: ignore[union-attr]
    device = Device(mosquitto, topics, new_device_id())
    payload = device.telemetry()
    # The same message again, as a QoS 1 redelivery or an offline-buffer replay would be.
    assert device.client.publish(topics.telemetry(device.id), payload) in (0, 0x10)
    device.telemetry()
    wait_until(lambda: stored(cloud, device.id) == [0, 1], what="two distinct rows")
    assert cloud.service.counters["duplicate_telemetry"] == 1
    device.client.close()


def test_the_cloud_service_runs_over_mtls(make_cloud: CloudFactory, mosquitto: RunningBroker,
                                         topics: Topics) -> None:
    """The cloud on the services' mTLS listener, a device on the devices': no password."""
    files = mosquitto.tls_files(mosquitto.cloud_username)
    cloud = make_cloud(mqtt={"port": mosquitto.tls_service_port, "password": None,
                             "tls": {"ca_file": files.ca, "cert_file": files.cert,
                                     "key_file": files.key}})
    device = SyncClient(mosquitto.host, mosquitto.tls_port, client_id="dev-tls",
                        tls=mosquitto.tls_files("dev-tls"))
    assert not device.connect().is_failure
    session = uuid.uuid4().hex[:8]
    for seq in range(3):
        body = {"device_id": "dev-tls", "session_id": session, "seq": seq, "ts": now(),
                "cpu_percent": 10.0, "memory_percent": 20.0, "disk_percent": 30.0}
        assert device.publish(topics.telemetry("dev-tls"), json.dumps(body).encode()) in (
            0, 0x10)
    wait_until(lambda: stored(cloud, "dev-tls") == [0, 1, 2], what="stored over mTLS")
    device.close()


def test_a_new_topic_root_unsubscribes_the_old_roots_filters(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str], tmp_path: Path,
) -> None:
    """The session is persistent: what an earlier configuration subscribed stays unless
    the service drops it, and the old root's messages would keep coming to be refused."""
    instance, data = f"rs{uuid.uuid4().hex[:6]}", tmp_path / "root-switch"
    old = Topics(f"o{uuid.uuid4().hex[:6]}/edgefl/v1")
    make_cloud(instance=instance, data_dir=data, topic_root=old.root).stop()
    cloud = make_cloud(instance=instance, data_dir=data)  # the same instance, the test's root
    device = Device(mosquitto, topics, new_device_id())
    refused = cloud.service.health.refused["unknown"]["topic"]
    stale = json.dumps({"device_id": device.id, "session_id": device.session, "seq": 99,
                        "ts": now(), "cpu_percent": 1.0, "memory_percent": 1.0,
                        "disk_percent": 1.0}).encode()
    assert device.client.publish(old.telemetry(device.id), stale) in (0, 0x10)
    device.telemetry()  # after it, on the same connection: the cloud sees them in order
    wait_until(lambda: stored(cloud, device.id) == [0], what="the current root's reading")
    assert cloud.service.health.refused["unknown"]["topic"] == refused
    device.client.close()


@pytest.mark.parametrize(("change", "reason"), [
    ({"cpu_percent": "high"}, "refused_validation"),
    ({"cpu_percent": 250.0}, "refused_validation"),
    ({"device_id": "someone-else"}, "refused_device_mismatch"),
    ({"ts": now() + 3600}, "refused_future_timestamp"),
    ({"padding": "x" * 300_000}, "refused_too_large"),
])
def test_bad_messages_are_refused_with_a_reason_and_never_stored(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str], change: dict[str, Any], reason: str,
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    device.telemetry(**change)
    device.telemetry()  # a good one after it: the service keeps going
    wait_until(lambda: stored(cloud, device.id) == [1], what="the good message stored")
    assert cloud.service.counters[reason] == 1
    device.client.close()


def test_unregistered_devices_are_refused_when_registration_is_required(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    known, unknown = new_device_id(), new_device_id()
    cloud = make_cloud(ingest={"require_registration": True, "provisioned": [known]})
    a, b = Device(mosquitto, topics, known), Device(mosquitto, topics, unknown)
    b.telemetry()
    a.telemetry()
    wait_until(lambda: stored(cloud, known) == [0], what="provisioned device stored")
    assert stored(cloud, unknown) == []
    assert cloud.service.counters["refused_unknown_device"] == 1


def test_alert_lifecycle(make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
                         new_device_id: Callable[[], str]) -> None:
    cloud = make_cloud()
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.filter(TopicKind.ALERT))
    device = Device(mosquitto, topics, new_device_id())
    topic = topics.alert(device.id, "cpu_high")
    device.telemetry(cpu_percent=95.0)  # 1 sample: below for_samples=2
    device.telemetry(cpu_percent=96.0)
    opened = watcher.wait_topic(topic)
    alert = decode_message(Alert, opened.payload)
    assert (alert.rule, alert.severity.value, alert.value) == ("cpu_high", "major", 96.0)
    device.telemetry(cpu_percent=97.0)  # still over: no duplicate
    device.telemetry(cpu_percent=85.0)  # under the threshold, above the clear level: open
    device.telemetry(cpu_percent=50.0)  # cleared
    cleared = watcher.wait_for(lambda m: m.topic == topic and m.payload == b"")
    assert cleared.payload == b""
    assert len(watcher.received_on(topic)) == 2
    wait_until(lambda: any(r["resolved"] for r in cloud.rows(
        "SELECT * FROM alerts WHERE device_id=?", (device.id,))), what="resolution stored")
    history = cloud.rows("SELECT * FROM alerts WHERE device_id=?", (device.id,))
    assert len(history) == 1 and history[0]["resolved_at"] >= history[0]["opened_at"]
    # A late subscriber finds nothing retained: the alert is gone from the broker.
    late = mosquitto.connected(mosquitto.cloud_username)
    sentinel = topics.alert(device.id, "sentinel")
    late.subscribe(topic)
    late.subscribe(sentinel)
    assert watcher.publish(sentinel, b"{}") in (0, 0x10)
    late.wait_topic(sentinel)
    assert late.received_on(topic) == []
    for c in (watcher, late, device.client):
        c.close()


def test_silent_device_raises_an_absence_alert(make_cloud: CloudFactory,
                                               mosquitto: RunningBroker, topics: Topics,
                                               new_device_id: Callable[[], str]) -> None:
    make_cloud()
    watcher = mosquitto.connected(mosquitto.cloud_username)
    device = Device(mosquitto, topics, new_device_id())
    topic = topics.alert(device.id, "device_silent")
    watcher.subscribe(topic)
    device.telemetry(interval_s=0.1)
    alert = decode_message(Alert, watcher.wait_topic(topic, timeout=10).payload)
    assert alert.severity.value == "critical"
    device.telemetry(interval_s=0.1)  # it speaks again: resolved
    watcher.wait_for(lambda m: m.topic == topic and m.payload == b"")
    watcher.close()
    device.client.close()


def test_registry_lwt_and_stale_death(make_cloud: CloudFactory, make_agent: AgentFactory,
                                      mosquitto: RunningBroker, topics: Topics) -> None:
    cloud = make_cloud()
    agent = make_agent()
    registry = cloud.service.registry
    wait_until(lambda: (r := registry.get(agent.device_id)) is not None and r.online,
               what="online")
    first = agent.session.bd_seq
    agent.session.drop()
    wait_until(lambda: registry.get(agent.device_id).bd_seq == first + 1  # type: ignore[union-attr]
               and registry.get(agent.device_id).online, what="back online")  # type: ignore[union-attr]
    # The death of the first connection arriving late must not mark it offline.
    late_death = DeviceState(device_id=agent.device_id, state="offline", bd_seq=first, ts=now(),
                             reason="lwt")
    # (Through the agent's own session: one identity holds one connection.)
    agent.session.publish(topics.device_state(agent.device_id), late_death.to_json())
    wait_until(lambda: registry.counters["stale_death"] >= 1, what="stale death counted")
    assert registry.get(agent.device_id).online  # type: ignore[union-attr]
    agent.stop()
    wait_until(lambda: not registry.get(agent.device_id).online,  # type: ignore[union-attr]
               what="offline after shutdown")


def test_two_instances_with_a_shared_group_store_every_message_once(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    a = make_cloud(mqtt={"shared_group": group})
    b = make_cloud(mqtt={"shared_group": group})
    devices = [Device(mosquitto, topics, new_device_id()) for _ in range(2)]
    for _ in range(50):
        for device in devices:
            device.telemetry()

    def total() -> int:
        return sum(len(stored(c, d.id)) for c in (a, b) for d in devices)

    wait_until(lambda: total() == 100, timeout=20, what="100 rows across both instances")
    for device in devices:
        in_a, in_b = set(stored(a, device.id)), set(stored(b, device.id))
        assert not in_a & in_b, "a message was stored by both instances"
        assert in_a | in_b == set(range(50))
    share_a = sum(len(stored(a, d.id)) for d in devices)
    assert 0 < share_a < 100, "the load was not split between the instances"
    for device in devices:
        device.client.close()


def test_alert_state_survives_a_restart(make_cloud: CloudFactory, mosquitto: RunningBroker,
                                        topics: Topics, new_device_id: Callable[[], str],
                                        tmp_path: Any) -> None:
    first = make_cloud(instance="restarting", data_dir=tmp_path / "cloud")
    device = Device(mosquitto, topics, new_device_id())
    device.telemetry(cpu_percent=95.0)
    device.telemetry(cpu_percent=95.0)
    wait_until(lambda: bool(first.service.alerts.engine.active()), what="alert open")
    wait_until(lambda: bool(first.rows("SELECT * FROM alerts")), what="alert stored")
    first.stop()
    second = make_cloud(instance="restarting", data_dir=tmp_path / "cloud")
    assert [a.rule for a in second.service.alerts.engine.active()] == ["cpu_high"]
    device.telemetry(cpu_percent=10.0)
    wait_until(lambda: all(r["resolved"] for r in second.rows("SELECT * FROM alerts")),
               what="resolved after restart")
    device.client.close()


def test_cli_reads_devices_alerts_and_reports(make_cloud: CloudFactory, mosquitto: RunningBroker,
                                              topics: Topics,
                                              new_device_id: Callable[[], str]) -> None:
    from edgefl.cli import build_app

    app = build_app()
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    device.state("online", 0)
    for cpu in (95.0, 96.0, 20.0):
        device.telemetry(cpu_percent=cpu, prediction_count=10, error_count=1)
    wait_until(lambda: len(stored(cloud, device.id)) == 3, what="stored")
    wait_until(lambda: bool(cloud.rows("SELECT * FROM alerts WHERE resolved=1")),
               what="alert resolved")
    data_dir = str(cloud.settings.data_dir)
    runner = CliRunner()
    listing = runner.invoke(app, ["devices", "--data-dir", data_dir, "--json"])
    assert listing.exit_code == 0, listing.output
    assert device.id in {d["device_id"] for d in json.loads(listing.output)}
    history = runner.invoke(app, ["alerts", "--all", "--data-dir", data_dir, "--json"])
    assert [r["rule"] for r in json.loads(history.output)] == ["cpu_high"]
    result = runner.invoke(app, ["report", device.id, "--since", "1h", "--data-dir", data_dir,
                                 "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["telemetry_messages"] == 3
    assert (body["predictions"], body["errors"]) == (30, 3)
    assert body["cpu_percent_max"] == 96.0
    assert body["uptime_s"] > 0 and len(body["alerts"]) == 1
    assert any("error rate" in r for r in body["recommendations"])
    device.client.close()


def test_telemetry_reaches_the_influxdb_protocol_server_once(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics, victoria: Any,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(influx={"url": victoria.url, "token": "t", "org": "edgefl",
                               "bucket": "fleet"})
    device = Device(mosquitto, topics, new_device_id())
    device.client.publish(topics.device_state(device.id), DeviceState.model_validate({
        "device_id": device.id, "state": "online", "bd_seq": 0, "ts": now(),
        "agent_version": "t", "hardware": HW, "site": "plant-7"}).to_json(), retain=True)
    wait_until(lambda: (r := cloud.service.registry.get(device.id)) is not None
               and r.site == "plant-7", what="birth with site")
    first = device.telemetry(cpu_percent=42.5, temperature_c=61.0)
    assert device.client.publish(topics.telemetry(device.id), first) in (0, 0x10)  # duplicate
    device.telemetry(cpu_percent=43.5)
    series = victoria.wait_export("device_telemetry_cpu_percent", points=2, device_id=device.id)
    assert len(series) == 1
    assert series[0]["metric"]["site"] == "plant-7"
    assert sorted(series[0]["values"]) == [42.5, 43.5]
    temperature = victoria.export("device_telemetry_temperature_c", device_id=device.id)
    assert [s["values"] for s in temperature] == [[61.0]]
    assert stored(cloud, device.id) == [0, 1]
    assert cloud.service.counters["duplicate_telemetry"] == 1
    device.client.close()


def test_cloud_command_announces_itself_and_its_death(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Any,
) -> None:
    import signal
    import subprocess
    import sys
    from pathlib import Path

    watcher = mosquitto.connected(mosquitto.cloud_username)
    state_topic = topics.cloud_state()
    watcher.subscribe(state_topic)
    password = tmp_path / "pw"
    password.write_text(mosquitto.password(mosquitto.cloud_username))
    command = [sys.executable, "-m", "edgefl", "cloud", "--broker",
               f"{mosquitto.host}:{mosquitto.service_port}", "--password-file", str(password),
               "--data-dir", str(tmp_path / "cloud"), "--topic-root", topics.root,
               "--instance", "cli-cloud"]
    repo = Path(__file__).resolve().parents[1]

    def states() -> list[str]:
        return [json.loads(m.payload)["state"] for m in watcher.received_on(state_topic)]

    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: states()[-1:] == ["online"], timeout=30, what="cloud online")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        wait_until(lambda: states()[-1:] == ["offline"], what="clean offline state")
        # Killed without a goodbye: the broker publishes the will.
        killed = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_until(lambda: states()[-1:] == ["online"], timeout=30, what="online again")
        killed.kill()
        killed.wait()
        wait_until(lambda: states()[-1:] == ["offline"], what="LWT offline")
    finally:
        if proc.poll() is None:
            proc.kill()
    watcher.close()


def test_sequence_gap_is_counted_and_the_device_asked_to_report(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    device.client.subscribe(topics.command(device.id, "report_now"))
    device.telemetry()
    device.seq = 3  # seqs 1 and 2 never arrive
    device.telemetry()
    request = device.client.wait_topic(topics.command(device.id, "report_now"))
    assert json.loads(request.payload)["args"]["missing"] == 2
    assert cloud.service.registry.get(device.id).seq_gaps == 2  # type: ignore[union-attr]
    device.client.close()


def test_acknowledge_from_the_cli(make_cloud: CloudFactory, mosquitto: RunningBroker,
                                  topics: Topics, new_device_id: Callable[[], str]) -> None:
    from edgefl.cli import build_app

    app = build_app()
    cloud = make_cloud()
    watcher = mosquitto.connected(mosquitto.cloud_username)
    device = Device(mosquitto, topics, new_device_id())
    topic = topics.alert(device.id, "cpu_high")
    watcher.subscribe(topic)
    device.telemetry(cpu_percent=99.0)
    device.telemetry(cpu_percent=99.0)
    watcher.wait_topic(topic)
    result = CliRunner().invoke(app, ["alerts", "--ack", device.id, "cpu_high", "--by", "alice",
                                      "--data-dir", str(cloud.settings.data_dir)])
    assert result.exit_code == 0, result.output
    acked = watcher.wait_for(lambda m: m.topic == topic and m.payload != b""
                             and decode_message(Alert, m.payload).state == "acknowledged")
    assert decode_message(Alert, acked.payload).acknowledged_by == "alice"
    wait_until(lambda: cloud.rows("SELECT acknowledged_by FROM alerts WHERE device_id=?",
                                  (device.id,))[0]["acknowledged_by"] == "alice",
               what="acknowledgement stored")
    watcher.close()
    device.client.close()


def test_influx_down_buffers_then_alerts_on_the_clouds_health(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    from broker.launcher import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    cloud = make_cloud(influx={"url": dead, "token": "t", "org": "o", "bucket": "b",
                               "max_buffer_points": 3, "retries": 0, "timeout_s": 1})
    watcher = mosquitto.connected(mosquitto.cloud_username)
    topic = topics.alert(cloud.settings.instance, "influx_sink")
    watcher.subscribe(topic)
    device = Device(mosquitto, topics, new_device_id())
    for _ in range(6):
        device.telemetry()
    alert = decode_message(Alert, watcher.wait_topic(topic, timeout=15).payload)
    assert alert.severity.value == "critical" and "InfluxDB" in alert.message
    wait_until(lambda: len(stored(cloud, device.id)) == 6, what="SQLite unaffected")
    stats = cloud.service.influx.stats()  # type: ignore[union-attr]
    assert stats.dropped >= 3
    watcher.close()
    device.client.close()
