"""The cloud service: one aiomqtt session, components that own their topics.

One reconnect loop around the client; inside a connection, the components run
together in an ``asyncio.TaskGroup`` (dispatcher, storage writer, sink flusher,
alert ticker) and stop together. The service publishes its own retained
``online``/``offline`` state on ``cloud/state`` (the will sets ``offline``),
like Sparkplug's primary-host STATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections import Counter
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud.alerting import AlertComponent
from cloud.alerts.rules import load_rules
from cloud.ingest import INGESTED_KINDS, Ingest
from cloud.registry import DeviceRegistry
from cloud.settings import CloudSettings
from cloud.storage.influx_sink import InfluxSink
from cloud.storage.sink import TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from schemas.alerts import CloudState
from schemas.base import now
from schemas.errors import TopicError
from schemas.topics import TopicKind, Topics

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
FL_TICK_S = 0.1


class CloudService:
    """ingest + registry + alert engine (later: FL coordinator, rollout)."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.counters: Counter[str] = Counter()
        self.store = SqliteStore(settings.sqlite_path)
        self.influx = InfluxSink(settings.influx) if settings.influx else None
        self.sinks: list[TelemetrySink] = [self.store]
        if self.influx is not None:
            self.sinks.append(self.influx)
        self.registry = DeviceRegistry(self.store)
        self.alerts = AlertComponent(load_rules(settings.alerts.rules_file), self.store,
                                     self.topics, settings.instance)
        self.ingest = Ingest(settings, self.topics, self.registry, self.alerts, self.sinks,
                             self.publish, self.counters)
        self.coordinators: dict[str, Any] = {}
        if settings.fl:
            from cloud.fl.coordinator import Coordinator  # torch only where FL runs

            for name, config in settings.fl.items():
                self.coordinators[name] = Coordinator(
                    name, config, topics=self.topics, store=self.store, registry=self.registry,
                    sinks=self.sinks, folder=settings.data_dir / "fl" / name,
                    publish=self.publish, counters=self.counters)
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    # -- publishing ---------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1 publish on the current connection (counted and dropped while offline)."""
        client = self._client
        if client is None:
            self.counters["publish_while_offline"] += 1
            logger.warning("not connected: dropped publish on %s", topic)
            return
        await client.publish(topic, payload, qos=1, retain=retain)

    def _state(self, state: str) -> bytes:
        return CloudState.model_validate(
            {"state": state, "instance": self.settings.instance, "ts": now()}).to_json()

    # -- lifecycle -------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        mqtt = self.settings.mqtt
        v5 = mqtt.protocol == 5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = mqtt.session_expiry_s
        tls = None
        if mqtt.tls is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(mqtt.tls.ca_file),
                certfile=str(mqtt.tls.cert_file) if mqtt.tls.cert_file else None,
                keyfile=str(mqtt.tls.key_file) if mqtt.tls.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        session: dict[str, Any] = {"clean_start": False} if v5 else {"clean_session": False}
        return aiomqtt.Client(
            mqtt.host, mqtt.port, identifier=self.settings.client_id,
            username=mqtt.username, password=mqtt.resolved_password(),
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            **session,
            properties=properties, keepalive=mqtt.keepalive_s, tls_params=tls,
            will=aiomqtt.Will(self.topics.cloud_state(), self._state("offline"), qos=1,
                              retain=True),
            max_queued_incoming_messages=0,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, reconnecting with jittered backoff."""
        attempt = 0
        mqtt = self.settings.mqtt
        try:
            while not stop.is_set():
                try:
                    async with self._client_for() as client:
                        attempt = 0
                        await self._serve(client, stop)
                except* aiomqtt.MqttError as group:  # also from inside the TaskGroup
                    self.connected.clear()
                    self._client = None
                    logger.warning("broker connection lost or refused: %s", group.exceptions[0])
                if stop.is_set():
                    break
                cap = min(mqtt.reconnect_max_s, mqtt.reconnect_min_s * 2 ** min(attempt, 20))
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), random.uniform(cap / 2, cap))  # noqa: S311
        finally:
            await self.ingest.flush()
            for sink in self.sinks:
                await asyncio.to_thread(sink.close)

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        self._client = client
        await client.publish(self.topics.cloud_state(), self._state("online"), qos=1,
                             retain=True)
        for topic_filter in self.ingest.filters():
            await client.subscribe(topic_filter, qos=1)
        for name in self.coordinators:
            await client.subscribe(self.topics.filter(TopicKind.UPDATE, task=name), qos=1)
            await client.subscribe(self.topics.filter(TopicKind.EVAL, task=name), qos=1)
        for coordinator in self.coordinators.values():
            await coordinator.start()
        self.alerts.resume()
        self.connected.set()
        logger.info("cloud %s serving on %s:%s", self.settings.instance, self.settings.mqtt.host,
                    self.settings.mqtt.port)
        try:
            async with asyncio.TaskGroup() as group:
                dispatcher = group.create_task(self._dispatch(client))
                tasks = [dispatcher, group.create_task(self.ingest.writer()),
                         group.create_task(self._flusher()),
                         group.create_task(self._ticker()),
                         group.create_task(self._fl_ticker())]
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            self.connected.clear()
        await self.ingest.flush()
        await client.publish(self.topics.cloud_state(), self._state("offline"), qos=1,
                             retain=True)
        self._client = None

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        # aiomqtt's iterator creates a task and an asyncio.wait per message; under load,
        # the messages already queued are taken in a burst instead (same queue, same
        # order), which raised ingest throughput (bench/bench_ingest.py).
        queue: asyncio.Queue[aiomqtt.Message] | None = getattr(client, "_queue", None)
        async for message in client.messages:
            await self._handle(message)
            while queue is not None and not queue.empty():
                await self._handle(queue.get_nowait())

    async def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind in INGESTED_KINDS:
                await self.ingest.handle(parsed, payload)
            elif parsed.kind in (TopicKind.UPDATE, TopicKind.EVAL) \
                    and parsed.task in self.coordinators:
                coordinator = self.coordinators[parsed.task]
                if parsed.device_id is None or parsed.round is None:
                    return
                if parsed.kind is TopicKind.UPDATE:
                    coordinator.on_update(parsed.device_id, parsed.round, payload)
                else:
                    coordinator.on_eval(parsed.device_id, parsed.round, payload)
                await coordinator.tick()  # close the round as soon as the last one reported
            else:
                self.counters["unexpected_topic"] += 1
        except TopicError as exc:
            self.counters["refused_topic"] += 1
            logger.warning("refused message on %s: %s", topic, exc)
        except Exception:  # the one dispatcher: log, count, keep serving
            self.counters["dispatch_error"] += 1
            logger.exception("handling %s failed", topic)

    async def _flusher(self) -> None:
        """Push buffered sinks (InfluxDB) and alert on the cloud's own health."""
        if self.influx is None:
            return
        dropped = 0
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await asyncio.to_thread(self.influx.flush)
            stats = self.influx.stats()
            problem = None
            if stats.dropped > dropped:
                problem = (f"InfluxDB sink dropped {stats.dropped - dropped} point(s): "
                           "buffer full while the server is unreachable")
            elif not self.influx.healthy():
                problem = "InfluxDB sink cannot write; points are buffered"
            dropped = stats.dropped
            self.alerts.health("influx_sink", problem, float(stats.dropped))

    async def _fl_ticker(self) -> None:
        while True:
            await asyncio.sleep(FL_TICK_S)
            for coordinator in self.coordinators.values():
                await coordinator.tick()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alerts.tick_interval_s)
            self.alerts.tick()


class ServiceThread:
    """A CloudService on its own event loop in a thread (the demo and the tests use it)."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.service = CloudService(settings)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="cloud-service", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.service.run(self._stop))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            raise
        finally:
            self._loop.close()

    def start(self, timeout: float = 15.0) -> ServiceThread:
        """Start, and wait (bounded) until the service is connected and subscribed."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        ready = threading.Event()
        while not self.service.connected.is_set():
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"cloud service did not connect: {self.error!r}")
            ready.wait(0.02)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop (clean offline state, final flush) and join the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
