"""No device can hurt the cloud (real Mosquitto): bounded, strict and counted refusals."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.health import HealthCounters
from edge_node.inference import load_runtime
from edge_node.model_store import InstalledModel
from schemas.alerts import CloudHealth
from schemas.base import ModelFormat, decode_message, now
from schemas.codec import encode
from schemas.device import CommandStatus, DeviceState, DeviceTelemetry
from schemas.fl import UpdateEnvelope
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, agent_settings, send_command, wait_until
from tests.cloud_fixtures import CloudFactory, RunningCloud
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient
from tests.test_cloud_service import HW, Device, stored
from tests.test_edge_faults import TFLITE_MODEL
from tests.test_fl_faults import HandDevice, zeros
from tests.test_fl_rounds import TASK, fl_config

pytestmark = pytest.mark.integration
NO_BUDGET = {"rate_limit": {"enabled": False}}


def flood(client: SyncClient, topic: str, payloads: list[bytes], *, retain: bool = False,
          ) -> None:
    """Publish every payload (QoS 1, pipelined) and wait for the last PUBACK."""
    info = None
    for payload in payloads:
        info = client.client.publish(topic, payload, qos=1, retain=retain)
        while len(client.client._out_messages) > 500:
            time.sleep(0.001)
    assert info is not None
    info.wait_for_publish(60)


def health_counts(cloud: RunningCloud) -> dict[str, Any]:
    return cloud.service.health.snapshot()


# -- 1. one device cannot stop the cloud ------------------------------------------------


def test_ten_thousand_junk_updates_then_a_valid_one_then_a_restart(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="junk",
                         ingest=NO_BUDGET,
                         fl={TASK: fl_config(rounds=1, min_fit_clients=1,
                                             min_available_clients=1, round_timeout_s=300)})
    try:
        cloud.start()
        device = HandDevice(mosquitto, topics, new_device_id())
        plan = device.plan()
        junk = [os.urandom(64) for _ in range(10_050)]
        started = time.monotonic()
        flood(device.client, topics.update(TASK, plan.round, device.id), junk)

        def rejected() -> int:
            rows = cloud.rows("SELECT SUM(count) FROM fl_rejections WHERE task=?", (TASK,))
            return int(rows[0][0] or 0) if rows else 0

        wait_until(lambda: rejected() == 10_050, timeout=120, what="every junk update refused")
        handled_s = time.monotonic() - started
        device.send(plan, zeros(device.global_weights(plan.global_version)))
        watcher = mosquitto.connected(mosquitto.cloud_username)
        watcher.subscribe(topics.task_status(TASK))
        done = watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "finished",
                                timeout=30)
        status = json.loads(done.payload)
        assert sum(status["rejected_counts"].values()) == 10_050
        assert len(status["rejected"]) <= 20
        assert cloud.running()
        assert cloud.stop() == 0
        cloud.start()  # nothing persisted can stop a restart
        assert cloud.running()
        print(f"10,050 junk updates refused in {handled_s:.1f} s")
        assert handled_s < 60, f"10,050 refusals took {handled_s:.0f} s"
        watcher.close()
        device.client.close()
    finally:
        cloud.close()


def test_an_unreadable_saved_task_state_is_moved_aside_and_the_task_marked_failed(
    make_cloud: CloudFactory, tmp_path: Path,
) -> None:
    from cloud.storage.sqlite_store import SqliteStore

    data = tmp_path / "cloud"
    store = SqliteStore(data / "edgefl.sqlite3")
    store.put(f"fl:{TASK}", {"state": "collecting", "round": "not a number", "extra": 1})
    store.close()
    cloud = make_cloud(data_dir=data, fl={TASK: fl_config(rounds=1)})
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state.value == "failed", what="marked failed")
    assert "moved to" in (coordinator.state.message or "")
    assert cloud.rows("SELECT key FROM kv WHERE key LIKE ?", (f"fl:{TASK}:unreadable:%",))


# -- 2. one message cannot crash it ------------------------------------------------------


def test_integers_beyond_int64_are_refused_and_the_batch_is_kept(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    device.telemetry()
    device.telemetry(prediction_count=2**64)
    device.telemetry()
    birth = {"device_id": device.id, "state": "online", "bd_seq": 2**64, "ts": now(),
             "agent_version": "t", "hardware": HW.model_dump()}
    assert device.client.publish(topics.device_state(device.id), json.dumps(birth).encode(),
                                 retain=True) in (0, 0x10)
    wait_until(lambda: stored(cloud, device.id) == [0, 2], what="the good rows stored")
    refused = health_counts(cloud)["refused"]
    assert refused["telemetry"]["validation"] == 1
    assert refused["device_state"]["validation"] == 1
    assert cloud.service.registry.get(device.id) is not None
    assert cloud.service.registry.get(device.id).bd_seq == -1  # type: ignore[union-attr]
    device.client.close()


def test_a_row_the_store_cannot_hold_is_refused_alone(make_cloud: CloudFactory) -> None:
    from cloud.ingest import Pending

    cloud = make_cloud(start=False)
    ingest = cloud.service.ingest
    good = [DeviceTelemetry(device_id="d", session_id="s", seq=i, ts=now(), cpu_percent=1.0,
                            memory_percent=1.0, disk_percent=1.0) for i in range(3)]
    # Built without validation, as a bug elsewhere might: SQLite cannot hold 2**64.
    bad = DeviceTelemetry.model_construct(**{**good[0].model_dump(exclude={"error_rate_percent"}),
                                             "seq": 9, "prediction_count": 2**64})
    kept, refused = ingest._store_rows(Pending(telemetry=[good[0], bad, *good[1:]]), {})
    assert refused == 1
    assert [t.seq for t in kept.telemetry] == [0, 1, 2]
    assert [r["seq"] for r in cloud.rows("SELECT seq FROM telemetry ORDER BY seq")] == [0, 1, 2]


# -- 4. a budget per device ---------------------------------------------------------------


def test_a_flooding_device_is_rate_limited_and_the_others_are_not(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(ingest={"rate_limit": {"messages_per_s": 5, "message_burst": 20}})
    flooder, healthy = (Device(mosquitto, topics, new_device_id()) for _ in range(2))
    payloads = []
    for _ in range(300):
        payloads.append(json.dumps({
            "device_id": flooder.id, "session_id": flooder.session, "seq": flooder.seq,
            "ts": now(), "cpu_percent": 1.0, "memory_percent": 1.0,
            "disk_percent": 1.0}).encode())
        flooder.seq += 1
    started = time.monotonic()
    flood(flooder.client, topics.telemetry(flooder.id), payloads)
    flood_s = time.monotonic() - started
    for _ in range(5):
        healthy.telemetry()
    wait_until(lambda: stored(cloud, healthy.id) == [0, 1, 2, 3, 4], what="healthy stored")
    counts = health_counts(cloud)

    def handled() -> int:
        c = health_counts(cloud)
        return int(c["accepted"].get("telemetry", 0) + c["rate_limited"].get("telemetry", 0))

    wait_until(lambda: handled() == 305, what="every message counted")
    counts = health_counts(cloud)
    limited = counts["rate_limited"]["telemetry"]
    # A burst of 20, then 5 a second while the flood lasted (and until it was handled).
    assert 300 - 20 - 5 * (flood_s + 2) <= limited <= 280, (limited, flood_s)
    assert len(stored(cloud, flooder.id)) == 300 - limited
    for device in (flooder, healthy):
        device.client.close()


# -- 5. client ids are tied to identities ---------------------------------------------------


def test_impersonating_client_ids_for_thirty_seconds_disconnects_nobody(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    victim = make_agent(interval_s=0.2)
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.cloud_state())
    registry = cloud.service.registry
    wait_until(lambda: (r := registry.get(victim.device_id)) is not None and r.online,
               what="victim online")
    attackers = [(new_device_id(), cloud.settings.client_id), (new_device_id(), victim.device_id)]
    clients: list[mqtt.Client] = []
    kicked = [0]
    for username, client_id in attackers:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(username, mosquitto.password(username))

        def on_disconnect(*_args: Any) -> None:
            kicked[0] += 1

        client.on_disconnect = on_disconnect
        client.reconnect_delay_set(1, 1)  # reconnects whenever it is kicked
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        clients.append(client)
    seqs_before = victim.telemetry_seq
    deadline = time.monotonic() + 30
    wait_until(lambda: time.monotonic() >= deadline, timeout=35, what="30 s of attempts")
    for client in clients:
        client.disconnect()
        client.loop_stop()
    assert cloud.service.connections == 1, "the cloud was disconnected"
    assert victim.session.connect_count == 1, "the victim was disconnected"
    assert registry.counters["stale_death"] == 0
    states = [json.loads(m.payload)["state"] for m in watcher.received_on(topics.cloud_state())]
    assert "offline" not in states
    expected = victim.telemetry_seq
    assert expected - seqs_before >= 100
    wait_until(lambda: len(stored(cloud, victim.device_id)) == expected,
               what="every victim message stored")
    watcher.close()


# -- 6. retained data only where retained by design ------------------------------------


def test_retained_data_on_device_topics_is_refused_and_cleared(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()
    device = Device(mosquitto, topics, new_device_id())
    body = json.dumps({"device_id": device.id, "session_id": device.session, "seq": 99,
                       "ts": now(), "cpu_percent": 1.0, "memory_percent": 1.0,
                       "disk_percent": 1.0}).encode()
    reply = json.dumps({"correlation_id": "x", "device_id": device.id, "command": "ping",
                        "ts": now(), "status": "ok"}).encode()
    metrics_topic = topics.model_metrics(device.id, "m")
    published = {topics.telemetry(device.id): body,
                 topics.command_reply(device.id, "ping"): reply,
                 metrics_topic: b"x" * (1 << 20)}
    for topic, payload in published.items():
        assert device.client.publish(topic, payload, retain=True) in (0, 0x10)
    wait_until(lambda: sum(health_counts(cloud)["refused"].get(kind, {}).get(
        "retained_not_allowed", 0) for kind in ("telemetry", "command_reply", "model_metrics"))
        == 3, what="three refusals")
    assert stored(cloud, device.id) == []

    def none_retained() -> bool:
        late = mosquitto.connected(mosquitto.cloud_username)
        for topic in published:
            late.subscribe(topic)
        marker = topics.command(device.id, "marker")
        late.subscribe(marker)
        assert late.publish(marker, b"{}") in (0, 0x10)
        late.wait_topic(marker)
        found = [m for m in late.messages if m.retain and m.payload]
        late.close()
        return not found

    wait_until(none_retained, what="the retained copies cleared")
    fresh = make_cloud(data_dir=tmp_path / "fresh")
    device.telemetry()
    wait_until(lambda: stored(fresh, device.id) == [0], what="fresh cloud stores live only")
    device.client.close()


# -- 7. replays --------------------------------------------------------------------------


def test_an_old_birth_replayed_while_the_device_is_offline_is_refused(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics,
) -> None:
    cloud = make_cloud()
    agent = make_agent()
    registry = cloud.service.registry
    wait_until(lambda: (r := registry.get(agent.device_id)) is not None and r.online,
               what="online")
    birth = agent._birth(agent.session.bd_seq)
    agent.stop()
    wait_until(lambda: not registry.get(agent.device_id).online,  # type: ignore[union-attr]
               what="offline")
    replayer = mosquitto.connected(agent.device_id)  # the same identity, once it is gone
    assert replayer.publish(topics.device_state(agent.device_id), birth.to_json()) in (0, 0x10)
    old = birth.model_copy(update={"bd_seq": birth.bd_seq + 1, "ts": now() - 3600})
    assert replayer.publish(topics.device_state(agent.device_id), old.to_json()) in (0, 0x10)
    wait_until(lambda: health_counts(cloud)["refused"].get("device_state", {}) == {
        "stale_birth": 1, "birth_out_of_time": 1}, what="both refused")
    assert not registry.get(agent.device_id).online  # type: ignore[union-attr]
    replayer.close()


def test_an_update_sent_ten_years_ahead_is_refused(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=1,
                                           min_available_clients=1)})
    device = HandDevice(mosquitto, topics, new_device_id())
    plan = device.plan()
    delta = zeros(device.global_weights(plan.global_version))
    envelope = UpdateEnvelope(task=TASK, round=plan.round, device_id=device.id,
                              base_version=plan.global_version, num_examples=10,
                              sent_at=now() + 10 * 365 * 86_400)
    assert device.client.publish(topics.update(TASK, plan.round, device.id),
                                 encode(delta, envelope)) in (0, 0x10)
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.round.counts.get("future_timestamp") == 1, what="refused")
    assert coordinator.accepted == {}
    device.client.close()


# -- 8. MQTT 3.1.1: nothing oversized reaches the broker ------------------------------------


def test_an_oversized_reply_under_mqtt_311_is_refused_locally_and_wedges_nothing(
    topics: Topics, tmp_path: Path,
) -> None:
    from broker.launcher import MosquittoProcess, free_port
    from broker.provision import add_identity, init_broker, write_config_files
    from broker.settings import BrokerSettings
    from tests.conftest import TEST_ROOT_FILTER, RunningBroker

    settings = BrokerSettings(data_dir=tmp_path / "broker", port=free_port(),
                              service_port=free_port(), observer_port=free_port(),
                              topic_root=TEST_ROOT_FILTER,
                              max_packet_size=64 * 1024)
    identities = {settings.cloud_username: init_broker(settings, log_to_file=True),
                  "dev-small": add_identity(settings, "dev-small")}
    process = MosquittoProcess(write_config_files(settings, log_to_file=True), settings.host,
                               settings.port, log_file=settings.layout.log).start()
    broker = RunningBroker(settings.host, settings.port, 0, settings, process, identities)
    from edge_node.agent import EdgeAgent

    agent = EdgeAgent(agent_settings(broker, topics, "dev-small", tmp_path / "dev",
                                     interval_s=0.2,
                                     mqtt={"protocol": 4, "max_packet_bytes": 64 * 1024}))
    installed = InstalledModel("1", ModelFormat.TFLITE, "0" * 64, 1, "A", str(TFLITE_MODEL))
    agent.inference.activate("m", installed, load_runtime(TFLITE_MODEL, ModelFormat.TFLITE),
                             None)
    cloud = broker.connected(broker.cloud_username)
    cloud.subscribe(topics.all())
    try:
        agent.start()
        assert agent.session.connected.wait(10)
        result = send_command(cloud, topics, "dev-small", "infer",
                              {"model": "m", "inputs": [[0] * 64] * 400})
        assert result.status is CommandStatus.ERROR and "too large" in (result.error or "")
        before = agent.telemetry_seq
        wait_until(lambda: agent.telemetry_seq >= before + 5, what="reporting goes on")
        assert agent.session.connect_count == 1, "the session was wedged"
        assert agent.counters["refused_packet_too_large"] == 1
    finally:
        agent.stop()
        cloud.close()
        process.stop()


# -- 9. refusals are observable ------------------------------------------------------------


def test_each_kind_of_bad_message_moves_its_counter_by_one_and_counts_survive_a_restart(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    data = tmp_path / "cloud"
    cloud = make_cloud(data_dir=data, health_interval_s=0.2,
                       fl={TASK: fl_config(rounds=1, min_fit_clients=2,
                                           min_available_clients=2)})
    device = HandDevice(mosquitto, topics, new_device_id())
    other = HandDevice(mosquitto, topics, new_device_id())
    plan = device.plan()
    telemetry = Device(mosquitto, topics, device.id)
    telemetry.client.close()
    telemetry.client = device.client  # one connection per identity
    good = {"device_id": device.id, "session_id": telemetry.session, "ts": now(),
            "cpu_percent": 1.0, "memory_percent": 1.0, "disk_percent": 1.0}
    t = topics.telemetry(device.id)
    cases: list[tuple[str, str, bytes, bool]] = [
        (t, "invalid_json", b'{"device_id": ', False),
        (t, "validation", json.dumps({**good, "seq": True}).encode(), False),
        (t, "empty", b"", False),
        (t, "too_large", json.dumps({**good, "seq": 1, "pad": "x" * 300_000}).encode(), False),
        (t, "device_mismatch", json.dumps({**good, "seq": 2, "device_id": other.id}).encode(),
         False),
        (t, "future_timestamp", json.dumps({**good, "seq": 3, "ts": now() + 86_400}).encode(),
         False),
        (t, "retained_not_allowed", json.dumps({**good, "seq": 4}).encode(), True),
    ]
    before = cloud.service.health.snapshot()
    for topic, _reason, payload, retain in cases:
        assert device.client.publish(topic, payload, retain=retain) in (0, 0x10)
    delta = zeros(device.global_weights(plan.global_version))
    device.send(plan, delta, round_=plan.round + 5)  # stale_round
    nan = {k: np.full_like(v, np.nan) for k, v in delta.items()}
    device.send(plan, nan)  # non_finite
    device.client.publish(topics.update(TASK, plan.round, device.id), b"junk")  # truncated
    device.client.publish(topics.device_state(device.id), DeviceState(
        device_id=device.id, state="online", bd_seq=0, ts=now() - 3600, agent_version="t",
        hardware=HW).to_json(), retain=True)  # birth_out_of_time

    def moved() -> dict[str, dict[str, int]]:
        after = cloud.service.health.snapshot()["refused"]
        return {k: {r: n - before["refused"].get(k, {}).get(r, 0) for r, n in v.items()
                    if n != before["refused"].get(k, {}).get(r, 0)} for k, v in after.items()}

    expected = {"telemetry": {reason: 1 for _, reason, _, _ in cases},
                "update": {"stale_round": 1, "non_finite": 1, "truncated": 1},
                "device_state": {"birth_out_of_time": 1}}
    try:
        wait_until(lambda: {k: v for k, v in moved().items() if v} == expected,
                   what="each counter moved by one")
    except TimeoutError:
        assert {k: v for k, v in moved().items() if v} == expected, moved()
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.cloud_health(cloud.settings.instance))
    message = watcher.wait_for(lambda m: m.retain or bool(m.payload))
    health = decode_message(CloudHealth, message.payload)
    assert health.instance == cloud.settings.instance
    watcher.close()
    wait_until(lambda: not cloud.service.retained_to_clear, what="the retained copy cleared")
    final = cloud.service.health.snapshot()
    wait_until(lambda: cloud.service.ingest.batches > 0 and cloud.service.store.get(
        "cloud_health") == cloud.service.health.snapshot(), what="counts persisted")
    cloud.stop()
    again = make_cloud(data_dir=data, fl={TASK: fl_config(rounds=1, min_fit_clients=2,
                                                          min_available_clients=2)})
    restored = again.service.health.snapshot()["refused"]
    assert restored == final["refused"], json.dumps([restored, final["refused"]])
    from typer.testing import CliRunner

    from edgefl.cli import build_app

    app = build_app()
    status = CliRunner().invoke(app, ["cloud", "status", "--data-dir", str(data), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["refused"]["telemetry"]["retained_not_allowed"] >= 1
    for d in (device, other):
        d.client.close()


# -- 10. the store is private -----------------------------------------------------------


def test_the_cloud_store_is_created_owner_only(make_cloud: CloudFactory) -> None:
    cloud = make_cloud()
    mode = stat.S_IMODE(cloud.settings.sqlite_path.stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_health_counters_build_a_valid_message() -> None:
    from collections import Counter

    health = HealthCounters(Counter())
    health.accept("telemetry")
    health.refuse("telemetry", "validation")
    message = health.message(instance="c", started_at=now(), connected=True, queues={"a": 1})
    assert message.refused == {"telemetry": {"validation": 1}}
    assert message.accepted == {"telemetry": 1}
