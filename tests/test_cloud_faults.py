"""The cloud service under faults (real Mosquitto): nothing acknowledged is lost, stop is
bounded, alerts never go stale, and no blocking work runs on the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.mqtt_link import Inbound, MqttLink
from cloud.service import ServiceThread
from cloud.settings import CloudSettings
from schemas.base import now
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import TEST_RULES, CloudFactory
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.test_cloud_service import Device

pytestmark = pytest.mark.integration


def cloud_settings(broker: RunningBroker, topics: Topics, data_dir: Path, rules: Path,
                   **overrides: Any) -> CloudSettings:
    """Settings of an in-process cloud for ``broker`` (fast flushes, ticks, reconnects)."""
    return CloudSettings.model_validate({
        "instance": overrides.pop("instance", f"c{uuid.uuid4().hex[:8]}"),
        "topic_root": topics.root, "data_dir": data_dir,
        "mqtt": {"host": broker.host, "port": broker.service_port,
                 "password": broker.password(broker.cloud_username),
                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5} | overrides.pop("mqtt", {}),
        "ingest": {"flush_interval_s": 0.05} | overrides.pop("ingest", {}),
        "alerts": {"rules_file": rules, "tick_interval_s": 0.1},
        **overrides,
    })


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(TEST_RULES)
    return path


@pytest.fixture
def services() -> Iterator[list[ServiceThread]]:
    started: list[ServiceThread] = []
    yield started
    for service in started:
        service.stop()


# -- 0. acknowledged only once stored ------------------------------------------------------


def test_the_link_acknowledges_only_what_it_is_told_and_the_broker_redelivers_the_rest(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, rules: Path,
    new_device_id: Callable[[], str],
) -> None:
    """Pins the one reach into paho (manual_ack): aiomqtt has no manual acknowledgement."""
    settings = cloud_settings(mosquitto, topics, tmp_path / "c", rules)
    device = Device(mosquitto, topics, new_device_id())

    async def receive(link: MqttLink, count: int) -> list[Inbound]:
        got: list[Inbound] = []
        async with asyncio.timeout(10):
            async for message in link.messages():
                got.append(message)
                if len(got) == count:
                    return got
        return got

    async def scenario() -> None:
        link = MqttLink(settings, (topics.cloud_state(), b""))
        await link.connect()
        await link.subscribe([topics.filter(TopicKind.TELEMETRY)])
        sent = [device.telemetry() for _ in range(3)]
        first = await receive(link, 3)
        assert [m.payload for m in first] == sent
        link.ack(first[0])
        await link.disconnect()
        await link.connect()  # same client id, persistent session
        again = await receive(link, 2)
        assert [m.payload for m in again] == sent[1:], "unacknowledged ones come back"
        for message in again:
            link.ack(message)
        link.ack(first[2])  # from the previous connection: never sent on this one
        assert link.acks_stale == 1
        await link.disconnect()
        await link.connect()
        marker = device.telemetry()
        (next_one,) = await receive(link, 1)
        assert next_one.payload == marker, "acknowledged messages are not delivered again"
        link.ack(next_one)
        await link.disconnect()

    asyncio.run(scenario())
    device.client.close()


def test_cloud_sigkilled_ten_times_under_a_fleet_loses_and_doubles_nothing(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, make_agent: AgentFactory,
) -> None:
    seed = random.randrange(1 << 30)
    print(f"fault seed {seed}")
    rng = random.Random(seed)
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="kill10")
    try:
        cloud.start()  # its persistent session exists from now on: nothing after is lost
        agents = [make_agent(interval_s=0.05) for _ in range(5)]
        def count() -> int:
            return len(cloud.rows("SELECT 1 FROM telemetry"))

        def kill_at_a_random_moment() -> None:
            stored = count()
            wait_until(lambda: count() > stored, timeout=30, what="the cloud storing again")
            deadline = time.monotonic() + rng.uniform(0.05, 1.5)
            wait_until(lambda: time.monotonic() >= deadline, what="a random moment")
            cloud.kill()

        for _ in range(10):
            kill_at_a_random_moment()
            cloud.start(wait_online=rng.random() < 0.5)
        for agent in agents:
            agent.stop()
        expected = {a.device_id: {a.session_id: a.telemetry_seq} for a in agents}
        cloud.wait_stored(expected)
        for agent in agents:
            seqs = cloud.telemetry_seqs(agent.device_id)[agent.session_id]
            assert seqs == list(range(agent.telemetry_seq)), f"{agent.device_id}: lost or doubled"
        assert cloud.stop() == 0
    finally:
        cloud.close()


# -- 1. stop is bounded ----------------------------------------------------------------


def test_start_and_stop_fifty_times_under_load_every_stop_within_five_seconds(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, rules: Path,
    make_agent: AgentFactory,
) -> None:
    agents = [make_agent(interval_s=0.05) for _ in range(2)]
    settings = cloud_settings(mosquitto, topics, tmp_path / "c", rules, instance="stop50",
                              ingest={"flush_interval_s": 0.01})
    def start_store_stop() -> float:
        service = ServiceThread(settings).start()
        ingest = service.service.ingest
        stored = ingest.stored
        wait_until(lambda: ingest.stored > stored, what="storing under load")
        started = time.monotonic()
        service.stop(timeout=5.0)
        return time.monotonic() - started

    stops = sorted(start_store_stop() for _ in range(50))
    print(f"50 stops under load: median {stops[25]:.3f} s, slowest {stops[-1]:.3f} s")
    assert stops[-1] < 5.0
    for agent in agents:
        agent.stop()
    final = ServiceThread(settings).start()
    expected = {a.device_id: a.telemetry_seq for a in agents}
    wait_until(lambda: all(
        len(final.service.store.query("SELECT 1 FROM telemetry WHERE device_id=?", (d,))) == n
        for d, n in expected.items()), timeout=30, what="nothing lost across 50 restarts")
    final.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_at_once(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path, signum: int,
) -> None:
    broker = restartable_mosquitto
    cloud = CloudProcess(broker, topics, tmp_path / "cloud", instance="sigint2",
                         stop_timeout_s=120, mqtt={"publish_timeout_s": 120})
    cloud.start()
    pid = broker.process.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)  # a broker that no longer answers: the stop hangs on it
        assert cloud.proc is not None
        cloud.proc.send_signal(signum)
        with pytest.raises(subprocess.TimeoutExpired):
            cloud.proc.wait(1.0)  # the graceful stop waits for the broker
        started = time.monotonic()
        cloud.proc.send_signal(signum)
        assert cloud.proc.wait(5) == 128 + signum
        assert time.monotonic() - started < 3.0
    finally:
        os.kill(pid, signal.SIGCONT)
        cloud.close()


# -- 2. alerts never cost telemetry, and never go stale ---------------------------------


def test_telemetry_survives_broker_restarts_while_alerts_open_and_close(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path, rules: Path,
    services: list[ServiceThread],
) -> None:
    broker = restartable_mosquitto
    service = ServiceThread(cloud_settings(broker, topics, tmp_path / "c", rules))
    services.append(service.start())
    device = Device(broker, topics, "dev-a")
    acknowledged: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            seq = device.seq
            cpu = 95.0 if seq % 3 else 10.0  # cpu_high opens (2 samples) and resolves
            body = {"device_id": device.id, "session_id": device.session, "seq": seq,
                    "ts": now(), "cpu_percent": cpu, "memory_percent": 20.0,
                    "disk_percent": 30.0, "interval_s": 0.2}
            try:
                code = device.client.publish(topics.telemetry(device.id),
                                             json.dumps(body).encode(), timeout=2)
            except TimeoutError:
                continue  # broker away: send the same message again
            if code in (0, 0x10):
                acknowledged.append(seq)
                device.seq += 1

    thread = threading.Thread(target=produce, daemon=True)
    device.client.client.reconnect_delay_set(1, 1)
    thread.start()
    try:
        def flowing() -> None:
            count = len(acknowledged)
            wait_until(lambda: len(acknowledged) >= count + 30, timeout=30,
                       what="telemetry flowing")

        for _ in range(3):
            flowing()
            broker.process.stop()
            broker.process.start()
        flowing()
    finally:
        stop.set()
        thread.join(10)
    store = service.service.store
    wait_until(lambda: len(store.query("SELECT 1 FROM telemetry WHERE device_id=?",
                                       (device.id,))) >= len(acknowledged), timeout=30,
               what="every acknowledged message stored")
    seqs = [r["seq"] for r in store.query(
        "SELECT seq FROM telemetry WHERE device_id=? ORDER BY seq", (device.id,))]
    assert set(acknowledged) <= set(seqs)
    assert len(store.query("SELECT 1 FROM alerts")) > 3, "alerts opened during the test"
    device.client.close()


def test_an_acknowledgement_made_while_the_broker_is_away_reaches_the_retained_alert(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path, rules: Path,
    services: list[ServiceThread],
) -> None:
    broker = restartable_mosquitto
    service = ServiceThread(cloud_settings(broker, topics, tmp_path / "c", rules))
    services.append(service.start())
    device = Device(broker, topics, "dev-a")
    for _ in range(2):
        device.telemetry(cpu_percent=95.0)
    engine = service.service.alerts.engine
    wait_until(lambda: bool(engine.active()), what="alert open")
    device.client.close()
    broker.process.stop()
    with service.service.store.transaction() as db:  # what `edgefl alerts --ack` does
        db.execute("INSERT INTO alert_acks(device_id, rule, by, requested_at) "
                   "VALUES (?,?,?,?)", (device.id, "cpu_high", "ops", now()))
    wait_until(lambda: engine.active()[0].acknowledged_by == "ops", what="acknowledged")
    broker.process.start()
    retained_alert(broker, topics, device.id, lambda a: a["state"] == "acknowledged")


def test_active_alerts_are_published_again_when_the_broker_lost_them(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path, rules: Path,
    services: list[ServiceThread],
) -> None:
    broker = restartable_mosquitto
    service = ServiceThread(cloud_settings(broker, topics, tmp_path / "c", rules))
    services.append(service.start())
    device = Device(broker, topics, "dev-a")
    for _ in range(2):
        device.telemetry(cpu_percent=95.0)
    wait_until(lambda: bool(service.service.alerts.engine.active()), what="alert open")
    device.client.close()
    broker.process.stop()
    for stale in broker.settings.layout.persistence.glob("*.db"):
        stale.unlink()  # the broker comes back without its retained messages
    broker.process.start()
    retained_alert(broker, topics, device.id, lambda a: a["state"] == "firing")


def retained_alert(broker: RunningBroker, topics: Topics, device_id: str,
                   check: Callable[[dict[str, Any]], bool]) -> None:
    """Wait until the alert is (re)published, then check a late subscriber gets it retained."""
    topic = topics.alert(device_id, "cpu_high")
    watcher = broker.connected(broker.cloud_username)
    watcher.subscribe(topic)
    watcher.wait_for(lambda m: bool(m.payload) and check(json.loads(m.payload)), timeout=15)
    watcher.close()
    late = broker.connected(broker.cloud_username)
    late.subscribe(topic)
    message = late.wait_topic(topic)
    late.close()
    assert message.retain and check(json.loads(message.payload))


# -- 3. nothing blocking on the event loop ---------------------------------------------


def test_no_sqlite_files_aggregation_or_evaluation_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    rules: Path, make_agent: AgentFactory, services: list[ServiceThread],
) -> None:
    from cloud.fl.fedavg import FedAvg
    from cloud.storage.sqlite_store import SqliteStore
    from fl_tasks.digits import DigitsTask
    from tests.test_fl_rounds import TASK, device_fl, fl_config

    calls: list[tuple[str, int]] = []

    def watch(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append((f"{cls.__name__}.{name}", threading.get_ident()))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in ((SqliteStore, "transaction"), (SqliteStore, "query"),
                      (FedAvg, "add"), (FedAvg, "finalize"), (DigitsTask, "evaluate")):
        watch(cls, name)
    # Decoding, validating and writing files, as the coordinator's module calls them.
    import cloud.fl.coordinator as coordinator_module

    for function in ("decode", "validate_update", "write_atomic", "encode"):
        original_function = getattr(coordinator_module, function)

        def watched(*args: Any, _f: Any = original_function, _n: str = function,
                    **kwargs: Any) -> Any:
            calls.append((f"coordinator.{_n}", threading.get_ident()))
            return _f(*args, **kwargs)

        monkeypatch.setattr(coordinator_module, function, watched)
    settings = cloud_settings(mosquitto, topics, tmp_path / "c", rules,
                              fl={TASK: fl_config(rounds=2, min_fit_clients=2,
                                                  min_available_clients=2)})
    service = ServiceThread(settings)
    services.append(service)
    calls.clear()  # construction runs before the loop does
    service.start()
    loop_thread = service._thread.ident
    for i in range(2):
        make_agent(fl=device_fl(i, 2), interval_s=0.1)
    coordinator = service.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state.value == "finished", timeout=120,
               what="2 rounds")
    with service.service.store.transaction() as db:  # an acknowledgement for the ticker
        db.execute("INSERT INTO alert_acks(device_id, rule, by, requested_at) "
                   "VALUES ('x', 'y', 'ops', 0)")
    wait_until(lambda: not service.service.store.query("SELECT 1 FROM alert_acks"),
               what="ack consumed")
    on_loop = sorted({name for name, ident in calls if ident == loop_thread})
    assert {name for name, _ in calls} >= {
        "SqliteStore.transaction", "FedAvg.add", "FedAvg.finalize", "DigitsTask.evaluate",
        "coordinator.decode", "coordinator.validate_update", "coordinator.write_atomic",
        "coordinator.encode"}
    assert on_loop == [], f"blocking work on the event loop: {on_loop}"


def test_two_cloud_processes_with_one_instance_name_say_so_and_back_off(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    first = CloudProcess(mosquitto, topics, tmp_path / "a", instance="twin",
                         mqtt={"reconnect_max_s": 5})
    second = CloudProcess(mosquitto, topics, tmp_path / "b", instance="twin",
                          mqtt={"reconnect_max_s": 5})
    try:
        first.start()
        second.start(wait_online=False)

        def said() -> bool:
            return any("another process runs as cloud instance 'twin'" in p.log.read_text()
                       for p in (first, second))

        wait_until(said, timeout=30, what="the takeover said in one line")
        deadline = time.monotonic() + 10
        wait_until(lambda: time.monotonic() >= deadline, timeout=15, what="10 s")
        logs = [p.log.read_text() for p in (first, second)]
        said_lines = sum(log.count("another process runs as cloud instance") for log in logs)
        assert said_lines <= 2, f"said {said_lines} times: one line per process is enough"
        takeovers = sum(log.count("session taken over") for log in logs)
        assert takeovers <= 6, f"{takeovers} takeovers in about 10 s: they fight"
    finally:
        first.close()
        second.close()


@pytest.mark.allow_logged_exceptions  # the second case goes to asyncio's own handler
def test_a_write_registration_on_a_closed_socket_is_counted_not_logged(
    make_cloud: CloudFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    # aiomqtt schedules add_writer(fd) from paho's callback; a broker restart may close
    # the socket before it runs: EBADF inside the event loop, nothing lost.
    service = make_cloud().service
    loop = asyncio.new_event_loop()
    try:
        stale = {"message": "Exception in callback", "exception": OSError(9, "Bad file "
                 "descriptor"), "handle": "<Handle BaseSelectorEventLoop.add_writer(14)>"}
        service._loop_exception(loop, stale)
        assert service.health.errors["mqtt_stale_socket"] == 1
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        other = {"message": "Exception in callback", "exception": ValueError("boom")}
        service._loop_exception(loop, other)  # anything else: the loop's default handler
        assert [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    finally:
        loop.close()
