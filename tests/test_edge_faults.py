"""The edge agent under faults: a failing or full disk, threads racing each other, and
models serving far more calls than the latency sample holds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_node.agent import EdgeAgent
from edge_node.counters import Counters
from edge_node.inference import load_runtime
from edge_node.inference_service import InferenceService
from edge_node.model_store import InstalledModel
from edge_node.offline_buffer import OfflineBuffer
from schemas.base import ModelFormat, decode_message
from schemas.device import (
    CommandResult,
    CommandStatus,
    DeploymentState,
    DeploymentStatus,
    DeviceTelemetry,
)
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, agent_settings, send_command, telemetry, wait_until
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

TFLITE_MODEL = Path(__file__).resolve().parent / "fixtures" / "models" / "digits_mlp.tflite"


class FailingCommit:
    """The buffer's connection, except that the next COMMIT fails like a disk error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail_next_commit = True

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, params)

    def close(self) -> None:
        self.db.close()


def rows_on_disk(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def fill_the_disk(buffer: OfflineBuffer) -> None:
    """Make the outbox's database really full (SQLITE_FULL), as a full partition does."""
    db = buffer._open()
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    db.execute(f"PRAGMA max_page_count={pages + 1}")
    db.execute("CREATE TABLE IF NOT EXISTS filler(x BLOB)")
    for _ in range(100_000):
        try:
            db.execute("INSERT INTO filler VALUES (zeroblob(512))")
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            return
    raise AssertionError("the database never filled up")


# -- 11. the offline buffer ------------------------------------------------------------


def test_buffer_counts_stay_true_when_a_commit_fails(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    buffer = OfflineBuffer(path, max_messages=3, max_bytes=10_000)
    buffer.append("t", b"a")
    buffer.append("t", b"b")
    real = buffer._open()
    failing = FailingCommit(real)
    buffer._db = failing  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        buffer.append("t", b"c")
    assert len(buffer) == rows_on_disk(path) == 2
    failing.fail_next_commit = True
    ids = [m.id for m in buffer.peek(10)]
    with pytest.raises(sqlite3.OperationalError):
        buffer.remove(ids[:1])
    assert len(buffer) == rows_on_disk(path) == 2
    buffer.remove(ids[:1])
    assert len(buffer) == rows_on_disk(path) == 1
    buffer.close()


@pytest.mark.integration
def test_a_full_disk_is_counted_reported_and_the_agent_keeps_going(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    broker = restartable_mosquitto
    observer = SyncClient(broker.host, broker.service_port, client_id="observer-disk",
                          username=broker.cloud_username,
                          password=broker.password(broker.cloud_username), session_expiry=600)
    assert not observer.connect().is_failure
    observer.subscribe(topics.telemetry("dev-a"))
    agent = EdgeAgent(agent_settings(broker, topics, "dev-a", tmp_path / "dev-a",
                                     interval_s=0.1))
    agent.start()
    try:
        assert agent.session.connected.wait(10)
        # Online, the outbox reuses the space of acknowledged messages; offline it must
        # grow, and the full disk refuses.
        fill_the_disk(agent.buffer)
        broker.process.stop()
        lost = agent.counters["buffer_lost_disk_error"]
        wait_until(lambda: agent.counters["buffer_lost_disk_error"] >= lost + 3,
                   what="messages lost while offline, counted")
        broker.process.start()
        reported = observer.wait_for(
            lambda m: decode_message(DeviceTelemetry, m.payload).counters.get(
                "buffer_lost_disk_error", 0) >= lost + 3, timeout=20)
        assert not decode_message(DeviceTelemetry, reported.payload).historical
        assert agent._thread is not None and agent._thread.is_alive()
    finally:
        agent.stop()
        observer.close()


@pytest.mark.integration
def test_replies_status_and_updates_wait_in_the_outbox_across_an_outage_and_a_restart(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    """Issue 9 item 8: the outbox, not paho's memory, holds every unacknowledged message.

    A command reply, a deployment status and an FL update produced on other threads while
    the broker is away survive the agent's stop and are delivered by the next start.
    """
    broker = restartable_mosquitto
    reply_topic = topics.command_reply("dev-a", "ping")
    status_topic = topics.deployment_status("dev-a", "digits")
    update_topic = topics.update("digits", 3, "dev-a")
    observer = SyncClient(broker.host, broker.service_port, client_id="observer-outbox",
                          username=broker.cloud_username,
                          password=broker.password(broker.cloud_username), session_expiry=600)
    assert not observer.connect().is_failure
    for topic in (reply_topic, status_topic, update_topic):
        observer.subscribe(topic)
    settings = agent_settings(broker, topics, "dev-a", tmp_path / "dev-a", interval_s=30)
    agent = EdgeAgent(settings)
    agent.start()
    second: EdgeAgent | None = None
    try:
        assert agent.session.connected.wait(10)
        broker.process.stop()
        wait_until(lambda: not agent.session.connected.is_set(), what="agent offline")
        reply = CommandResult(correlation_id="c0ffee", device_id="dev-a", command="ping",
                              ts=time.time(), status=CommandStatus.OK, result={"pong": 1})
        status = DeploymentStatus(device_id="dev-a", model="digits", ts=time.time(),
                                  state=DeploymentState.INSTALLED, active_version="1.0.0",
                                  slot="A")
        update = b"\x00update bytes of round 3" * 100

        def job_thread() -> None:  # as the command, OTA and FL threads do
            agent._send_reply("ping", reply)
            agent._publish_status(status)
            agent.send(update_topic, update)

        worker = threading.Thread(target=job_thread)
        worker.start()
        worker.join(10)
        agent.stop()
        assert rows_on_disk(tmp_path / "dev-a" / "outbox.sqlite3") >= 3
        broker.process.start()
        second = EdgeAgent(settings)
        second.start()
        got = {}
        for topic in (reply_topic, status_topic, update_topic):
            got[topic] = observer.wait_for(partial(lambda t, m: m.topic == t, topic),
                                           timeout=20)
        assert decode_message(CommandResult, got[reply_topic].payload) == reply
        assert decode_message(DeploymentStatus, got[status_topic].payload) == status
        assert got[update_topic].payload == update
        wait_until(lambda: rows_on_disk(tmp_path / "dev-a" / "outbox.sqlite3") == 0,
                   what="the outbox emptied by the acknowledgements")
    finally:
        if second is not None:
            second.stop()
        observer.close()


@pytest.mark.integration
def test_replies_status_and_updates_go_ahead_of_a_telemetry_backlog(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    """After an outage the telemetry backlog drains at its pace (here 5 a second); a
    status kept in the outbox and an update sent meanwhile do not wait behind it."""
    from edge_node.settings import BufferSettings

    broker = restartable_mosquitto
    status_topic = topics.deployment_status("dev-a", "digits")
    update_topic = topics.update("digits", 4, "dev-a")
    observer = SyncClient(broker.host, broker.service_port, client_id="observer-lane",
                          username=broker.cloud_username,
                          password=broker.password(broker.cloud_username), session_expiry=600)
    assert not observer.connect().is_failure
    for topic in (status_topic, update_topic, topics.telemetry("dev-a")):
        observer.subscribe(topic)
    agent = EdgeAgent(agent_settings(broker, topics, "dev-a", tmp_path / "dev-a",
                                     interval_s=0.05,
                                     buffer=BufferSettings(drain_rate_per_s=5.0)))
    agent.start()
    try:
        assert agent.session.connected.wait(10)
        broker.process.stop()
        wait_until(lambda: not agent.session.connected.is_set(), what="agent offline")
        wait_until(lambda: len(agent.buffer) >= 180, timeout=30, what="a telemetry backlog")
        status = DeploymentStatus(device_id="dev-a", model="digits", ts=time.time(),
                                  state=DeploymentState.INSTALLED, active_version="2.0.0",
                                  slot="B")
        worker = threading.Thread(target=agent._publish_status, args=(status,))
        worker.start()
        worker.join(10)
        last_of_backlog = agent.telemetry_seq - 1  # produced while offline

        def newest_telemetry() -> int:
            return max(decode_message(DeviceTelemetry, m.payload).seq
                       for m in observer.received_on(topics.telemetry("dev-a")))

        # What reached the observer before the outage may come again: a PUBACK lost with
        # the broker makes the agent send it once more (at least once, as QoS 1 allows).
        before_outage = Counter(decode_message(DeviceTelemetry, m.payload).seq
                                for m in observer.received_on(topics.telemetry("dev-a")))
        broker.process.start()
        got = observer.wait_for(lambda m: m.topic == status_topic, timeout=20)
        assert decode_message(DeploymentStatus, got.payload) == status
        update = b"\x01update of round 4" * 64
        agent.send(update_topic, update)
        assert observer.wait_for(lambda m: m.topic == update_topic, timeout=20).payload == update
        assert newest_telemetry() < last_of_backlog, "they waited for the backlog"
        agent.interval_s = 3600.0  # stop producing: the backlog can drain
        wait_until(lambda: newest_telemetry() >= last_of_backlog, timeout=120,
                   what="the backlog drained too")
        seqs = Counter(decode_message(DeviceTelemetry, m.payload).seq
                       for m in observer.received_on(topics.telemetry("dev-a")))
        again = {seq: n for seq, n in seqs.items() if n > 1}
        assert all(before_outage[seq] == 1 and n == 2 for seq, n in again.items()), \
            f"sent twice beyond an in-flight message at the outage: {again}"
    finally:
        agent.stop()
        observer.close()


# -- 12. threads -------------------------------------------------------------------------


def test_counters_are_exact_under_concurrent_increments() -> None:
    counters = Counters()

    def hammer() -> None:
        for _ in range(20_000):
            counters.add("x")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters["x"] == 160_000


@pytest.mark.integration
def test_a_subscription_made_between_connack_and_suback_is_sent(
    make_agent: AgentFactory, mosquitto: RunningBroker, topics: Topics,
) -> None:
    agent = make_agent(start=False)
    extra = topics.round_plan("late")  # readable by devices, not under any filter of theirs
    original = agent.session._on_connect

    def on_connect(client: mqtt.Client, *args: Any) -> None:
        original(client, *args)
        agent.session.subscribe(extra)  # CONNACK handled, SUBACK not yet

    agent.session.client.on_connect = on_connect
    agent.start()
    assert agent.session.connected.wait(10)
    received: list[str] = []
    previous = agent.session._on_message_cb

    def on_message(message: mqtt.MQTTMessage) -> None:
        received.append(message.topic)
        previous(message)

    agent.session._on_message_cb = on_message
    cloud = mosquitto.connected(mosquitto.cloud_username)
    assert cloud.publish(extra, b"{}") in (0, 0x10)
    wait_until(lambda: extra in received, what="the late subscription delivers")
    cloud.close()


def test_inference_never_runs_on_a_runtime_closed_by_a_switch() -> None:
    service = InferenceService(max_samples=64, window_s=60)
    installed = InstalledModel("1", ModelFormat.TFLITE, "0" * 64, 1, "A", str(TFLITE_MODEL))
    service.activate("m", installed, load_runtime(TFLITE_MODEL, ModelFormat.TFLITE), None)
    batch = np.zeros((1, 64), np.float32)
    errors: list[Exception] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                service.infer("m", batch)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(200):  # an OTA install or a rollback, over and over
        service.activate("m", installed, load_runtime(TFLITE_MODEL, ModelFormat.TFLITE), None)
    stop.set()
    for thread in threads:
        thread.join()
    service.close()
    assert errors == []


@pytest.mark.integration
def test_a_rollback_command_does_not_hold_the_agent_thread(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
) -> None:
    agent = make_agent(interval_s=0.1)
    busy = threading.Event()
    release = threading.Event()

    def long_install() -> None:
        busy.set()
        release.wait(30)

    agent.ota._jobs.put(long_install)
    assert busy.wait(5)
    before = len(telemetry(cloud, topics, agent.device_id))
    result: list[CommandResult] = []
    waiter = threading.Thread(target=lambda: result.append(
        send_command(cloud, topics, agent.device_id, "rollback", {"model": "nope"})))
    waiter.start()
    try:
        wait_until(lambda: len(telemetry(cloud, topics, agent.device_id)) >= before + 5,
                   what="telemetry goes on while the rollback waits")
    finally:
        release.set()
    waiter.join(15)
    assert result and result[0].status is CommandStatus.ERROR
    assert "no previous" in (result[0].error or "")


def test_ota_call_hands_any_exception_to_the_caller(make_agent: AgentFactory) -> None:
    agent = make_agent(start=False)
    agent.ota.start()

    def broken() -> Any:
        raise RuntimeError("unexpected")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="unexpected"):
        agent.ota.call(broken, timeout=10)
    assert time.monotonic() - started < 5
    agent.ota.stop()


FIRST_REPORT = """
import sys, threading, time
from edge_node.agent import EdgeAgent
from edge_node.settings import EdgeSettings
agent = EdgeAgent(EdgeSettings.model_validate_json(sys.stdin.read()))
agent.start()
deadline = time.monotonic() + 5
while agent.telemetry_published == 0 and time.monotonic() < deadline:
    sum(range(1000))  # a busy core during the first interval
agent.stop()
"""


@pytest.mark.integration
def test_the_first_telemetry_measures_cpu(mosquitto: RunningBroker, cloud: SyncClient,
                                          topics: Topics, tmp_path: Path,
                                          new_device_id: Callable[[], str]) -> None:
    # A fresh process: psutil keeps its CPU baseline per thread id, and ids are reused.
    device_id = new_device_id()
    settings = agent_settings(mosquitto, topics, device_id, tmp_path / device_id,
                              interval_s=0.3)
    password = tmp_path / "password"
    password.write_text(mosquitto.password(device_id))
    settings = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(
        update={"password": None, "password_file": password})})
    subprocess.run([sys.executable, "-c", FIRST_REPORT], input=settings.model_dump_json(),
                   text=True,
                   check=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    first = cloud.wait_for(lambda m: m.topic == topics.telemetry(device_id))
    assert decode_message(DeviceTelemetry, first.payload).cpu_percent > 0.0


# -- 13. throughput and CPU count every call -------------------------------------------


def test_throughput_counts_every_call_not_the_latency_sample() -> None:
    service = InferenceService(max_samples=2048, window_s=60)
    installed = InstalledModel("1", ModelFormat.TFLITE, "0" * 64, 1, "A", str(TFLITE_MODEL))
    service.activate("m", installed, load_runtime(TFLITE_MODEL, ModelFormat.TFLITE), None)
    batch = np.zeros((1, 64), np.float32)
    started = time.perf_counter()
    for _ in range(20_000):
        service.infer("m", batch)
    elapsed = time.perf_counter() - started
    stats = service.stats("m")
    assert stats is not None
    assert stats.samples == 20_000
    model = service.get("m")
    assert model is not None and len(model.calls) == 2048, "latency sample stays bounded"
    # Throughput over the model's life so far (< the window): every call counted.
    assert stats.throughput_per_s >= 20_000 / (elapsed + 1.0)
    assert stats.cpu_percent is not None and stats.cpu_percent > 2048 / 60
    assert service.take_interval("m") == (20_000, 0)
    assert service.take_interval("m") == (0, 0)
    service.close()


def test_interval_counts_reach_model_metrics(make_agent: AgentFactory, cloud: SyncClient,
                                             topics: Topics, tmp_path: Path) -> None:
    del tmp_path
    agent = make_agent(start=False, interval_s=0.2)
    installed = InstalledModel("1", ModelFormat.TFLITE, "0" * 64, 1, "A", str(TFLITE_MODEL))
    agent.inference.activate("m", installed, load_runtime(TFLITE_MODEL, ModelFormat.TFLITE),
                             None)
    agent.start()
    assert agent.session.connected.wait(10)
    for _ in range(300):
        agent.infer("m", np.zeros((1, 64), np.float32))
    from schemas.device import ModelMetrics

    topic = topics.model_metrics(agent.device_id, "m")
    cloud.wait_for(lambda m: m.topic == topic
                   and sum(decode_message(ModelMetrics, r.payload).interval_count
                           for r in cloud.received_on(topic)) >= 300)
    total = sum(decode_message(ModelMetrics, r.payload).interval_count
                for r in cloud.received_on(topic))
    assert total == 300
