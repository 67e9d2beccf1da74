"""No device can hurt the cloud (real Mosquitto): bounded, strict and counted refusals."""

from __future__ import annotations

import json
import os
import sqlite3
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
from schemas.codec import decode, encode
from schemas.device import CommandStatus, DeviceState, DeviceTelemetry
from schemas.fl import GlobalModelEnvelope, RoundPlan, TaskState, UpdateEnvelope
from schemas.topics import TopicKind, Topics
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
FL_DEVICE_KINDS = ("update", "eval", "secagg_device")


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


def refused(cloud: RunningCloud, kind: str, reason: str) -> int:
    return int(health_counts(cloud)["refused"].get(kind, {}).get(reason, 0))


def retained_left(mosquitto: RunningBroker, topics: Topics, device_id: str,
                  filters: list[str]) -> list[str]:
    """Topics under ``filters`` where a late subscriber still finds retained data."""
    late = mosquitto.connected(mosquitto.cloud_username)
    for topic_filter in filters:
        late.subscribe(topic_filter)
    marker = topics.command(device_id, "marker")
    late.subscribe(marker)
    assert late.publish(marker, b"{}") in (0, 0x10)
    late.wait_topic(marker)  # retained copies come before the marker
    found = [m.topic for m in late.messages if m.retain and m.payload]
    late.close()
    return found


def wait_cleared(mosquitto: RunningBroker, topics: Topics, device_id: str,
                 filters: list[str], timeout: float = 10.0) -> None:
    """Wait (bounded) until no retained data is left under ``filters``."""
    left: list[str] = []

    def cleared() -> bool:
        left[:] = retained_left(mosquitto, topics, device_id, filters)
        return not left

    try:
        wait_until(cleared, timeout=timeout, what="the retained copies cleared")
    except TimeoutError:
        pytest.fail(f"retained data left on {len(left)} topic(s): {sorted(left)[:5]}")


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


BROKEN = "broken"


def send_update(device: HandDevice, task: str, plan: RoundPlan,
                delta: dict[str, np.ndarray]) -> None:
    envelope = UpdateEnvelope(task=task, round=plan.round, device_id=device.id,
                              base_version=plan.global_version, nonce=plan.nonce,
                              num_examples=10, train_loss=1.0, sent_at=now())
    topic = device.topics.update(task, plan.round, device.id)
    assert device.client.publish(topic, encode(delta, envelope)) in (0, 0x10)


@pytest.mark.allow_logged_exceptions
def test_a_failure_inside_one_task_fails_that_task_and_nothing_else(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    from tests.fixtures.failing_task import FAILURE

    one = {"rounds": 3, "min_fit_clients": 1, "min_available_clients": 1}
    cloud = make_cloud(fl={
        TASK: fl_config(**one),
        BROKEN: fl_config(**one, task="tests.fixtures.failing_task:CentralEvalFailsTask",
                          task_kwargs={"fail_at_round": 2})})
    device = HandDevice(mosquitto, topics, new_device_id(), born=False)
    client = device.client
    for task in (TASK, BROKEN):
        if task != TASK:  # HandDevice follows TASK already
            client.subscribe(topics.round_plan(task))
            client.subscribe(f"{topics.root}/fl/{task}/global/+")
        client.subscribe(topics.task_status(task))
    birth = DeviceState.model_validate({
        "device_id": device.id, "state": "online", "bd_seq": 0, "ts": now(),
        "agent_version": "t", "hardware": HW, "memory_available_mb": 1024.0,
        "runtimes": {"torchscript": "2.13"}, "model_formats": ["torchscript"],
        "fl_tasks": [TASK, BROKEN]})
    assert client.publish(topics.device_state(device.id), birth.to_json(),
                          retain=True) in (0, 0x10)
    reporter = Device(mosquitto, topics, new_device_id())

    def plan(task: str, round_: int) -> RoundPlan:
        msg = client.wait_for(lambda m: m.topic == topics.round_plan(task) and bool(m.payload)
                              and json.loads(m.payload)["round"] == round_, timeout=60)
        return decode_message(RoundPlan, msg.payload)

    def status(task: str, state: TaskState) -> dict[str, Any]:
        msg = client.wait_for(lambda m: m.topic == topics.task_status(task) and bool(m.payload)
                              and json.loads(m.payload)["state"] == state.value, timeout=60)
        return dict(json.loads(msg.payload))

    deltas: dict[str, dict[str, np.ndarray]] = {}
    sent = 0
    for round_ in (1, 2, 3):
        for task in (TASK, BROKEN) if round_ <= 2 else (TASK,):
            current = plan(task, round_)
            if task not in deltas:
                msg = client.wait_topic(topics.global_model(task, current.global_version))
                deltas[task] = zeros(dict(decode(msg.payload, GlobalModelEnvelope).tensors))
            send_update(device, task, current, deltas[task])
            sent += 1
            reporter.telemetry()
    failed = status(BROKEN, TaskState.FAILED)
    assert failed["round"] == 2
    assert "RuntimeError" in failed["message"] and FAILURE in failed["message"], failed
    finished = status(TASK, TaskState.FINISHED)
    assert finished["round"] == 3
    assert cloud.service.coordinators[BROKEN].state.state is TaskState.FAILED
    # The service kept running: same connection, telemetry stored all along and after.
    reporter.telemetry()
    wait_until(lambda: stored(cloud, reporter.id) == list(range(sent + 1)),
               what="telemetry stored")
    assert cloud._thread.is_alive() and cloud.service.connected.is_set()
    assert cloud.service.connections == 1
    counts = health_counts(cloud)
    assert counts["errors"].get("fl_coordinator_error") == 1, counts["errors"]
    # Each update arrived once (the fl/+/... filters do not overlap): none a duplicate.
    assert counts["accepted"].get("update") == sent, counts
    assert "update" not in counts["duplicates"], counts
    reporter.client.close()
    client.close()


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


def test_a_retained_flood_is_rate_limited_and_still_cleared(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(ingest={"rate_limit": {"messages_per_s": 5, "message_burst": 20}})
    device = Device(mosquitto, topics, new_device_id())
    started = time.monotonic()
    for i in range(100):  # one retained message on each of 100 topics
        info = device.client.client.publish(topics.model_metrics(device.id, f"m{i}"),
                                            b"x" * 1024, qos=1, retain=True)
    info.wait_for_publish(30)

    def handled() -> int:
        c = health_counts(cloud)
        return (int(c["rate_limited"].get("model_metrics", 0))
                + refused(cloud, "model_metrics", "retained_not_allowed"))

    wait_until(lambda: handled() == 100, what="every message counted once")
    elapsed = time.monotonic() - started
    limited = health_counts(cloud)["rate_limited"]["model_metrics"]
    # A burst of 20, then 5 a second while the flood was handled.
    assert 100 - 20 - 5 * (elapsed + 1) <= limited <= 80, (limited, elapsed)
    everything = [topics.filter(TopicKind.MODEL_METRICS, device_id=device.id)]
    wait_cleared(mosquitto, topics, device.id, everything, timeout=60)
    assert handled() == 100, "a clear coming back was counted"
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
    connects = [0] * len(attackers)
    kicked = [0] * len(attackers)
    for i, (username, client_id) in enumerate(attackers):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(username, mosquitto.password(username))

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any, i: int = i) -> None:
            if not rc.is_failure:
                connects[i] += 1

        def on_disconnect(*_args: Any, i: int = i) -> None:
            kicked[i] += 1

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.reconnect_delay_set(1, 1)  # reconnects whenever it is kicked
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        clients.append(client)
    wait_until(lambda: all(connects), what="every impostor connected")
    seqs_before = victim.telemetry_seq
    deadline = time.monotonic() + 30
    wait_until(lambda: time.monotonic() >= deadline, timeout=35, what="30 s of attempts")
    # Each impostor really was on the broker the whole time, under its own identity: the
    # broker gives it its username as client id, so it takes nobody's session and nobody
    # takes its own (it connected once and was never kicked).
    held = [client.is_connected() for client in clients]
    kicked_during = list(kicked)
    for client in clients:
        client.disconnect()
        client.loop_stop()
    assert connects == [1, 1], connects
    assert held == [True, True] and kicked_during == [0, 0], (held, kicked_during)
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


def test_retained_fl_data_of_any_task_is_cleared_and_unknown_tasks_are_counted(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud()  # runs no task at all
    device = Device(mosquitto, topics, new_device_id())
    published = {topics.update("ghost", 3, device.id): b"u" * 4096,
                 topics.eval_result("phantom", 1, device.id): b'{"loss": 1.0}',
                 topics.secagg_device("ghost", 3, "keys", device.id): b"k" * 512}
    for topic, payload in published.items():
        assert device.client.publish(topic, payload, retain=True) in (0, 0x10)
    wait_until(lambda: [refused(cloud, k, "retained_not_allowed") for k in FL_DEVICE_KINDS]
               == [1, 1, 1], what="each refused as retained")
    wait_cleared(mosquitto, topics, device.id, list(published))
    assert [refused(cloud, k, "retained_not_allowed") for k in FL_DEVICE_KINDS] == [1, 1, 1]
    before = refused(cloud, "update", "unknown_task")
    assert device.client.publish(topics.update("ghost", 4, device.id), b"junk") in (0, 0x10)
    wait_until(lambda: refused(cloud, "update", "unknown_task") == before + 1,
               what="a live update for an unknown task counted")
    counts = health_counts(cloud)["refused"]
    assert not any("unexpected_topic" in counts.get(k, {}) for k in FL_DEVICE_KINDS), counts
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
                              base_version=plan.global_version, nonce=plan.nonce,
                              num_examples=10, sent_at=now() + 10 * 365 * 86_400)
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


def test_refusals_counted_after_the_last_batch_survive_a_restart(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    from cloud.health import STATE_KEY

    data = tmp_path / "cloud"
    fl = {TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=1)}
    cloud = make_cloud(data_dir=data, health_interval_s=3600, fl=fl)
    device = HandDevice(mosquitto, topics, new_device_id())
    plan = device.plan()
    junk = topics.update(TASK, plan.round, device.id)
    # Refused by the coordinator, which acknowledges it itself: no ingest batch saves it.
    assert device.client.publish(junk, b"junk") in (0, 0x10)
    wait_until(lambda: refused(cloud, "update", "truncated") == 1, what="refused")
    cloud.stop()  # saved at the stop
    again = make_cloud(data_dir=data, health_interval_s=0.2, fl=fl)
    assert refused(again, "update", "truncated") == 1
    assert device.client.publish(junk, b"junk") in (0, 0x10)

    def saved() -> int:
        record = again.service.store.get(STATE_KEY) or {}
        return int(record.get("refused", {}).get("update", {}).get("truncated", 0))

    wait_until(lambda: saved() == 2, what="saved on the health interval")
    device.client.close()


@pytest.mark.parametrize("garbage", ["not json {", '{"accepted": {"telemetry": "many"}}',
                                     "[1, 2]", '{"refused": {"telemetry": {"x": -1}}}',
                                     '{"acepted": {"telemetry": 3}}'])
def test_a_corrupt_saved_health_record_is_counted_and_the_cloud_starts(
    make_cloud: CloudFactory, tmp_path: Path, garbage: str,
) -> None:
    from cloud.health import STATE_KEY
    from cloud.storage.sqlite_store import SqliteStore

    data = tmp_path / "cloud"
    store = SqliteStore(data / "edgefl.sqlite3")
    with store.transaction() as db:
        db.execute("INSERT INTO kv(key, value) VALUES (?, ?)", (STATE_KEY, garbage))
    store.close()
    cloud = make_cloud(data_dir=data, health_interval_s=0.2)
    counts = health_counts(cloud)
    assert counts["errors"].get("health_restore_failed") == 1, counts
    assert not counts["refused"], counts  # nothing of the garbage was taken

    def saved_errors() -> object:
        rows = cloud.rows("SELECT value FROM kv WHERE key=?", (STATE_KEY,))
        try:
            record = json.loads(rows[0]["value"])
        except ValueError:
            return None
        return record.get("errors") if isinstance(record, dict) else None

    wait_until(lambda: saved_errors() == counts["errors"], what="counts saved over the garbage")


# -- 10. the store is private -----------------------------------------------------------


def test_the_cloud_store_is_created_owner_only(make_cloud: CloudFactory) -> None:
    cloud = make_cloud()
    mode = stat.S_IMODE(cloud.settings.sqlite_path.stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_an_existing_store_readable_by_others_is_tightened(tmp_path: Path) -> None:
    from cloud.storage.sqlite_store import SqliteStore

    path = tmp_path / "edgefl.sqlite3"
    other = sqlite3.connect(path)  # left open: its -wal and -shm stay
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE t(x)")
    other.execute("INSERT INTO t VALUES (1)")
    other.commit()
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    for file in files:
        file.chmod(0o644)
    store = SqliteStore(path)
    try:
        modes = [oct(stat.S_IMODE(f.stat().st_mode)) for f in files]
        assert modes == [oct(0o600)] * 3, modes
        assert store.query("SELECT x FROM t")[0]["x"] == 1
    finally:
        store.close()
        other.close()


def test_health_counters_build_a_valid_message() -> None:
    from collections import Counter

    health = HealthCounters(Counter())
    health.accept("telemetry")
    health.refuse("telemetry", "validation")
    message = health.message(instance="c", started_at=now(), connected=True, queues={"a": 1})
    assert message.refused == {"telemetry": {"validation": 1}}
    assert message.accepted == {"telemetry": 1}


def test_saved_health_keeps_the_larger_of_two_snapshots() -> None:
    """The ingest writer and the health interval save from two threads: whichever commits
    last, the store keeps the larger of every count (counters only grow)."""
    from cloud.service import _larger_counts

    older = {"accepted": {"telemetry": 5}, "refused": {"update": {"stale_round": 1}},
             "errors": {}}
    newer = {"accepted": {"telemetry": 9}, "refused": {"update": {"stale_round": 1,
                                                                  "norm_bound": 2}},
             "errors": {"dispatch_error": 1}}
    assert _larger_counts(newer, older) == newer
    assert _larger_counts(older, newer) == newer
