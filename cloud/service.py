"""The cloud service: components that own their topics, around one MQTT link.

Long-lived components run in one ``asyncio.TaskGroup`` for the life of the
service, across reconnections: the ingest writer (which commits batches and
only then acknowledges their messages), the alert ticker, the InfluxDB
flusher and one task per federated coordinator (the only owner of its state
machine). A reconnect loop around :class:`~cloud.mqtt_link.MqttLink` runs
the dispatcher for each connection; after each (re)connection every component
republishes its retained state (alerts, round plans, global weights, status).

Stopping is bounded: the dispatcher stops, coordinators finish their current
step, the writer commits and acknowledges what it holds, ``offline`` is
published, and the link disconnects, all within ``stop_timeout_s``. Whatever
was not acknowledged by then is delivered again by the broker on the next
start. The service publishes its own retained ``online``/``offline`` state on
``cloud/state`` (the will says ``offline``), like Sparkplug's primary host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import random
import secrets
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiomqtt

from cloud.alerting import AlertComponent
from cloud.alerts.rules import load_rules
from cloud.errors import CloudOffline
from cloud.fl.config import FLTaskConfig
from cloud.fl.errors import StrategyError
from cloud.fl.submissions import Submissions, TaskRequest
from cloud.health import STATE_KEY as HEALTH_KEY
from cloud.health import HealthCounters
from cloud.ingest import INGESTED_KINDS, Ingest
from cloud.models.registry import ModelRegistry
from cloud.models.rollout import RolloutManager
from cloud.mqtt_link import Inbound, MqttLink
from cloud.offload import off_loop
from cloud.rate_limit import DeviceBudget
from cloud.registry import DeviceRegistry
from cloud.settings import CloudSettings
from cloud.storage.influx_sink import InfluxSink
from cloud.storage.sink import TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from fl_tasks.errors import TaskError
from schemas.alerts import CloudHealth, CloudState
from schemas.base import decode_message, now
from schemas.catalog import content_type
from schemas.errors import DecodeError, TopicError
from schemas.topics import ParsedTopic, TopicKind, Topics

if TYPE_CHECKING:
    from cloud.fl.coordinator import Coordinator

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
HOUSEKEEPING_S = 1.0
TASK_REQUESTS_S = 0.5
TWIN_MEMORY_S = 60.0
"""How long another process with this instance name is remembered (for the backoff)."""
FL_DEVICE_KINDS = (TopicKind.UPDATE, TopicKind.EVAL, TopicKind.SECAGG_DEVICE)
SUBSCRIPTIONS_KEY = "mqtt:subscriptions"
"""Store key of the filters the last connection subscribed (what the session holds)."""
"""What a device publishes for a federated task (subscribed for every task, ``fl/+/...``)."""
NOT_RETAINED = frozenset({TopicKind.TELEMETRY, TopicKind.MODEL_METRICS, TopicKind.COMMAND_REPLY,
                          *FL_DEVICE_KINDS})
"""Device topics that are never retained by design: a retained message there is refused."""
DEVICE_KINDS = INGESTED_KINDS | set(FL_DEVICE_KINDS)
"""What a device publishes: each message is charged to its budget."""
YIELD_EVERY = 64
"""The dispatcher yields to the other tasks at least every this many messages."""


class CloudService:
    """ingest + registry + alert engine + federated coordinators."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.counters: Counter[str] = Counter()
        self.health = HealthCounters(self.counters)
        self.budget = DeviceBudget(settings.ingest.rate_limit)
        self.started_at = now()
        self.run_id = secrets.token_hex(6)
        self.twin_seen_at: float | None = None
        self.retained_to_clear: set[str] = set()
        self.store = SqliteStore(settings.sqlite_path)
        self._restore_health()
        self.influx = InfluxSink(settings.influx) if settings.influx else None
        self.sinks: list[TelemetrySink] = [self.store]
        if self.influx is not None:
            self.sinks.append(self.influx)
        self.registry = DeviceRegistry(self.store)
        self.models = ModelRegistry(self.store, settings.artifacts_dir)
        self.alerts = AlertComponent(load_rules(settings.alerts.rules_file), self.store,
                                     self.topics, settings.instance)
        self.link = MqttLink(settings, (self.topics.cloud_state(), self._state("offline")))
        self.ingest = Ingest(settings, self.topics, self.registry, self.alerts, self.store,
                             self.sinks, self.publish, self.link.ack, self.health)
        self.submissions = Submissions(self.store)
        self.rollouts = RolloutManager(
            store=self.store, models=self.models, devices=self.registry, topics=self.topics,
            publish=self.publish, health=self.health, key_path=settings.release_key_path,
            key_id=settings.models.key_id, chunk_bytes=settings.models.chunk_bytes,
            sinks=self.sinks)
        self.ingest.observers.append(self.rollouts.observe)
        self.coordinators: dict[str, Coordinator] = {}
        tasks = {**self.submissions.submitted(), **settings.fl}  # the settings file wins
        for name, config in tasks.items():
            self.coordinators[name] = self._coordinator(name, config)
        self._group: asyncio.TaskGroup | None = None
        self._fl_tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.connections = 0

    def _restore_health(self) -> None:
        """Continue from the saved counters; a corrupt record is counted, never fatal."""
        try:
            self.health.restore(self.store.get(HEALTH_KEY))
        except ValueError as exc:  # not JSON, or not counts (pydantic's ValidationError)
            logger.warning("saved health counters unreadable, starting from zero: %s",
                           str(exc)[:300])
            self.health.error("health_restore_failed")

    def _persist_health(self, snapshot: dict[str, Any]) -> None:
        """Save the counters when the store holds others (worker thread).

        Read, merged and written in one transaction. The ingest writer saves snapshots
        with its batches from another thread, so the stored one may be newer than ours:
        counters only grow, and the larger of each pair is kept.
        """
        with self.store.transaction():
            stored = self.store.get(HEALTH_KEY)
            merged = _larger_counts(stored, snapshot) if isinstance(stored, dict) else snapshot
            if stored != merged:
                self.store.put(HEALTH_KEY, merged)

    def _coordinator(self, name: str, config: FLTaskConfig) -> Coordinator:
        from cloud.fl.async_coordinator import AsyncCoordinator  # torch only where FL runs
        from cloud.fl.coordinator import Coordinator

        kind = AsyncCoordinator if config.mode == "async" else Coordinator
        return kind(name, config, topics=self.topics, store=self.store,
                    registry=self.registry, sinks=self.sinks,
                    folder=self.settings.data_dir / "fl" / name, publish=self.publish,
                    ack=self.link.ack, health=self.health, models=self.models)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop,
                        context: dict[str, Any]) -> None:
        """The event loop's handler: one known aiomqtt race counted, the rest as usual.

        aiomqtt registers the socket for writing with ``call_soon_threadsafe(add_writer,
        fd)``; when the connection closes before that callback runs (a broker restart),
        ``add_writer`` fails with EBADF on the closed descriptor. Nothing is lost: the
        connection is gone and the service reconnects. It is counted
        (``mqtt_stale_socket``), not logged as an error.
        """
        exc = context.get("exception")
        handle = repr(context.get("handle", ""))
        if isinstance(exc, OSError) and exc.errno == errno.EBADF and "add_writer" in handle:
            self.health.error("mqtt_stale_socket")
            logger.debug("write registration on a closed MQTT socket ignored: %s", exc)
            return
        loop.default_exception_handler(context)

    # -- publishing ---------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1 publish, waiting for the PUBACK; raises CloudOffline when not connected.

        Under MQTT 5 the content type and payload format indicator of the topic's
        kind go with it (``application/json``, ``application/vnd.safetensors``, ...).
        """
        await self.link.publish(topic, payload, retain=retain,
                                content_type=content_type(self.topics, topic))

    def _state(self, state: str) -> bytes:
        return CloudState.model_validate(
            {"state": state, "instance": self.settings.instance, "ts": now(),
             "run": self.run_id}).to_json()

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, reconnecting with jittered backoff."""
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                writer = group.create_task(self.ingest.writer(), name="ingest-writer")
                helpers = [group.create_task(self._alert_ticker(), name="alert-ticker"),
                           group.create_task(self._flusher(), name="influx-flusher"),
                           group.create_task(self._housekeeping(), name="housekeeping"),
                           group.create_task(self._task_requests(), name="task-requests"),
                           group.create_task(self.rollouts.run(), name="rollouts")]
                self._fl_tasks = [group.create_task(c.run(), name=f"fl-{name}")
                                  for name, c in self.coordinators.items()]
                await self._connections(stop, self._fl_tasks, writer)
                for task in (*helpers, *self._fl_tasks, writer):
                    task.cancel()
        finally:
            for sink in self.sinks:
                sink.close()

    async def _connections(self, stop: asyncio.Event, fl: list[asyncio.Task[None]],
                           writer: asyncio.Task[None]) -> None:
        attempt = 0
        mqtt = self.settings.mqtt
        while not stop.is_set():
            pause = 0.0
            if await self._connect(stop):
                attempt = 0
                try:
                    await self._serve(stop)
                    await self._wind_down(fl, writer, connected=True)
                except (aiomqtt.MqttError, CloudOffline) as exc:
                    twin = self.twin_seen_at is not None \
                        and time.monotonic() - self.twin_seen_at < TWIN_MEMORY_S
                    if twin or "taken over" in str(exc).lower():
                        # Do not fight the other process: wait the longest before returning.
                        self.health.error("session_taken_over")
                        pause = mqtt.reconnect_max_s
                        logger.warning("session taken over by the other %r process; retrying "
                                       "in %.0f s", self.settings.instance, pause)
                    else:
                        logger.warning("broker connection lost: %s", exc)
                else:
                    return
                finally:
                    self.connected.clear()
                    await self.link.disconnect()
            elif not stop.is_set():
                cap = min(mqtt.reconnect_max_s, mqtt.reconnect_min_s * 2 ** min(attempt, 20))
                attempt += 1
                pause = random.uniform(cap / 2, cap)  # noqa: S311 - jitter, not crypto
            if pause:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await stop.wait()
        await self._wind_down(fl, writer, connected=False)

    async def _connect(self, stop: asyncio.Event) -> bool:
        """Connect, unless ``stop`` is set first; False when refused or unreachable."""
        connecting = asyncio.create_task(self.link.connect(), name="mqtt-connect")
        stopping = asyncio.create_task(stop.wait(), name="stop-wait")
        try:
            await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
            await asyncio.wait([connecting, stopping])
        if connecting.cancelled():
            return False
        error = connecting.exception()
        if error is None:
            return True
        if not isinstance(error, aiomqtt.MqttError):
            raise error
        logger.warning("broker %s:%s refused or unreachable: %s", self.settings.mqtt.host,
                       self.settings.mqtt.port, error)
        return False

    async def _serve(self, stop: asyncio.Event) -> None:
        """One connection: announce, subscribe, resynchronise, dispatch until stop."""
        await self.publish(self.topics.cloud_state(), self._state("online"), True)
        # Every task's updates, evaluations and secure-aggregation inputs, run here or not:
        # a device may write them for any task, so whatever it leaves retained is seen
        # (and cleared), and whatever it sends for a task not run here is counted.
        filters = [self.topics.cloud_state(), *self.ingest.filters(),
                   *(self.topics.filter(kind) for kind in FL_DEVICE_KINDS)]
        watched = frozenset(f for f in filters if self._not_retained(f))
        await self.link.subscribe(filters, retain_as_published=watched)
        await self._drop_task_filters()
        await self._drop_filters_no_longer_asked(filters)
        self.connections += 1
        self.alerts.resume()
        self.alerts.on_connected()
        for coordinator in self.coordinators.values():
            coordinator.connected()
        self.connected.set()
        logger.info("cloud %s serving on %s:%s", self.settings.instance, self.settings.mqtt.host,
                    self.settings.mqtt.port)
        dispatcher = asyncio.create_task(self._dispatch(), name="dispatcher")
        stopping = asyncio.create_task(stop.wait(), name="stop-wait")
        try:
            await asyncio.wait([dispatcher, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (dispatcher, stopping):
                task.cancel()
            await asyncio.wait([dispatcher, stopping])
            self.connected.clear()
        if not stop.is_set():
            dispatcher.result()  # raises the MqttError that ended the connection
            raise aiomqtt.MqttError("dispatcher ended")

    async def _drop_task_filters(self) -> None:
        """Unsubscribe the per-task filters an older version left in the persistent session.

        They overlap the ``fl/+/...`` filters, and the broker delivers a message once per
        matching subscription. Done after subscribing the generic filters: a message in
        between arrives twice (handled idempotently) rather than not at all.
        """
        legacy = [self.topics.filter(kind, task=name) for name in sorted(self.coordinators)
                  for kind in (TopicKind.UPDATE, TopicKind.EVAL)]
        if legacy:
            await self._unsubscribe(legacy)

    async def _unsubscribe(self, filters: list[str]) -> None:
        """UNSUBSCRIBE, bounded; a broker that does not answer ends the connection."""
        try:
            async with asyncio.timeout(self.settings.mqtt.publish_timeout_s):
                await self.link.client.unsubscribe(filters, timeout=math.inf)
        except TimeoutError:
            raise aiomqtt.MqttError("no UNSUBACK within "
                                    f"{self.settings.mqtt.publish_timeout_s} s") from None

    async def _drop_filters_no_longer_asked(self, filters: list[str]) -> None:
        """Unsubscribe what an earlier configuration of this instance subscribed.

        The session is persistent: a filter the service no longer asks for (another topic
        root, a shared-subscription group it left) stays subscribed, and its messages keep
        arriving to be refused. The filters of each connection are kept in the store;
        those of the last one that are not asked for now are unsubscribed.
        """
        previous = await off_loop(self.store.get, SUBSCRIPTIONS_KEY)
        stale = sorted(set(previous or []) - set(filters))
        if stale:
            await self._unsubscribe(stale)
            logger.info("unsubscribed %d filter(s) of an earlier configuration: %s",
                        len(stale), ", ".join(stale))
        if previous != filters:
            await off_loop(self.store.put, SUBSCRIPTIONS_KEY, filters)

    def _on_cloud_state(self, message: Inbound) -> None:
        """Another process announcing this instance name: say so (it takes our session)."""
        self.ingest.acknowledge_later(message)
        try:
            state = decode_message(CloudState, message.payload)
        except DecodeError as exc:
            self.health.refuse("cloud_state", exc.reason)
            return
        if state.instance != self.settings.instance or state.run in (None, self.run_id) \
                or state.state != "online" or state.ts < self.started_at:
            return
        first = self.twin_seen_at is None or time.monotonic() - self.twin_seen_at > TWIN_MEMORY_S
        self.twin_seen_at = time.monotonic()
        self.health.error("twin_instance")
        if first:
            logger.error("another process runs as cloud instance %r (client id %s): two cloud "
                         "processes share the instance name and take each other's session; "
                         "give each its own --instance", self.settings.instance,
                         self.settings.client_id)

    def _not_retained(self, topic_filter: str) -> bool:
        """Whether a subscription filter covers a kind that is never retained by design."""
        if topic_filter.startswith("$share/"):
            topic_filter = topic_filter.split("/", 2)[2]
        levels = topic_filter.split("/")
        for kind in NOT_RETAINED:
            generic = self.topics.filter(kind).split("/")
            if len(generic) == len(levels) and all(
                    a == b or "+" in (a, b) for a, b in zip(generic, levels, strict=True)):
                return True
        return False

    async def _wind_down(self, fl: list[asyncio.Task[None]], writer: asyncio.Task[None], *,
                         connected: bool) -> None:
        """Stop the workers, commit and acknowledge what is held, say offline (bounded)."""
        try:
            async with asyncio.timeout(self.settings.stop_timeout_s):
                for task in (*fl, writer):
                    task.cancel()
                if fl or not writer.done():
                    await asyncio.wait([*fl, writer])
                await self.ingest.flush()
                await off_loop(self._persist_health, self.health.snapshot())
                if connected:
                    await self.publish(self.topics.cloud_state(), self._state("offline"), True)
        except TimeoutError:
            logger.warning("stop took longer than %.1f s; what was not acknowledged will be "
                           "delivered again", self.settings.stop_timeout_s)
        except CloudOffline as exc:
            logger.info("offline state not published: %s", exc)

    async def _dispatch(self) -> None:
        handled = 0
        async for message in self.link.messages():
            await self._handle(message)
            handled += 1
            if handled % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the writer, timers and coordinators run

    async def _handle(self, message: Inbound) -> None:
        topic = message.topic
        try:
            parsed = self.topics.parse(topic)
            kind = parsed.kind
            retained = message.retain and kind in NOT_RETAINED
            if retained and not message.payload:
                # An empty retained message: a clear (ours coming back, or a device's).
                # Not charged: it costs what a refusal costs, and our own clears coming
                # back must not count against the device that left the data.
                self.ingest.acknowledge_later(message)
                return
            if parsed.device_id is not None and kind in DEVICE_KINDS \
                    and not self.budget.allow(parsed.device_id, len(message.payload)):
                self._rate_limited(parsed.device_id, kind, message, clear=retained)
                return
            if retained:  # data left retained where nothing is retained by design
                self.ingest.refuse(message, kind.value, "retained_not_allowed",
                                   "the topic is not retained by design; clearing it")
                self.retained_to_clear.add(topic)
            elif kind is TopicKind.CLOUD_STATE:
                self._on_cloud_state(message)
            elif kind in INGESTED_KINDS:
                await self.ingest.handle(parsed, message)
            elif kind in FL_DEVICE_KINDS:
                self._on_fl_device(parsed, message)
            else:
                self.ingest.refuse(message, kind.value, "unexpected_topic",
                                   "no component owns it")
        except TopicError as exc:
            self.ingest.refuse(message, "unknown", "topic", str(exc))
        except Exception:  # the one dispatcher: log, count, acknowledge, keep serving
            self.health.error("dispatch_error")
            logger.exception("handling %s failed", topic)
            self.ingest.acknowledge_later(message)

    def _rate_limited(self, device_id: str, kind: TopicKind, message: Inbound, *,
                      clear: bool) -> None:
        """Over its budget: counted as rate_limited whatever it is (retained data is cleared)."""
        first = self.health.rate_limited[kind.value] == 0
        self.health.limit(kind.value)
        if first:
            logger.warning("%s is over its budget: refusing its messages (counted as "
                           "rate_limited)", device_id)
        if clear:
            self.retained_to_clear.add(message.topic)
        self.ingest.acknowledge_later(message)

    def _on_fl_device(self, parsed: ParsedTopic, message: Inbound) -> None:
        """A live update, evaluation or secure-aggregation input: to its task's coordinator."""
        kind = parsed.kind
        coordinator = self.coordinators.get(parsed.task or "")
        if coordinator is None:  # a task this service does not run: counted, quietly
            self.health.refuse(kind.value, "unknown_task")
            logger.debug("refused message on %s: unknown_task", message.topic)
            self.ingest.acknowledge_later(message)
        elif parsed.device_id is not None and parsed.round is not None:
            coordinator.submit(kind, parsed.device_id, parsed.round, message,
                               parsed.stage or "")
        else:  # every federated device topic names its device and round
            self.ingest.refuse(message, kind.value, "unexpected_topic", "no component owns it")

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

    async def _housekeeping(self) -> None:
        """Clear data retained where it must not be; store and publish the health.

        The counters are saved on the health interval when they changed (connected or
        not), so refusals counted after the ingest writer's last batch survive a restart.
        """
        last_health = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                report = time.monotonic() - last_health >= self.settings.health_interval_s
                if report:
                    last_health = time.monotonic()
                    await off_loop(self._persist_health, self.health.snapshot())
                for topic in sorted(self.retained_to_clear):
                    await self.publish(topic, b"", True)
                    self.retained_to_clear.discard(topic)
                if report:
                    await self._report_health()
            except CloudOffline as exc:
                logger.debug("housekeeping deferred: %s", exc)
            except Exception:  # the one handler of this loop: log, count, go on
                self.health.error("housekeeping_error")
                logger.exception("housekeeping failed")

    def health_message(self) -> CloudHealth:
        """The service's counters and queue depths now."""
        queues = {"pending": len(self.ingest.pending), "acks": len(self.ingest.pending.acks),
                  "alert_outbox": len(self.alerts.outbox),
                  "retained_to_clear": len(self.retained_to_clear)}
        queues |= {f"fl_inbox_{name}"[:64]: c.inbox.qsize()
                   for name, c in self.coordinators.items()}
        return self.health.message(instance=self.settings.instance, started_at=self.started_at,
                                   connected=self.connected.is_set(), queues=queues)

    async def _report_health(self) -> None:
        health = self.health_message()
        for sink in self.sinks:
            await off_loop(sink.write_cloud_health, health)
        await self.publish(self.topics.cloud_health(self.settings.instance), health.to_json(),
                           True)

    async def _task_requests(self) -> None:
        """Start the federated tasks ``edgefl fl start`` asked for (one at a time)."""
        while True:
            await asyncio.sleep(TASK_REQUESTS_S)
            try:
                for request in await off_loop(self.submissions.pending):
                    await self._start_requested(request)
            except Exception:  # the one handler of this loop: log, count, go on
                self.health.error("task_request_error")
                logger.exception("handling task requests failed")

    async def _start_requested(self, request: TaskRequest) -> None:
        name = request.name
        if name in self.coordinators:
            state = self.coordinators[name].state.state.value
            await off_loop(self.submissions.answer, request.id, "refused",
                           f"a task named {name!r} exists ({state}): choose another name")
            return
        try:
            coordinator = await off_loop(self._coordinator, name, request.config)
        except (TaskError, StrategyError, ImportError, AttributeError, ValueError, TypeError,
                OSError) as exc:
            await off_loop(self.submissions.answer, request.id, "refused",
                           f"{type(exc).__name__}: {exc}"[:1024])
            return
        self.coordinators[name] = coordinator
        assert self._group is not None  # noqa: S101 - set while the service runs
        self._fl_tasks.append(self._group.create_task(coordinator.run(), name=f"fl-{name}"))
        if self.connected.is_set():  # its topics are subscribed already (fl/+/...)
            coordinator.connected()
        await off_loop(self.submissions.answer, request.id, "started")
        logger.info("federated task %s started (requested by edgefl fl start)", name)

    async def _alert_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alerts.tick_interval_s)
            try:
                await self.alerts.tick()
            except Exception:  # the one handler of this loop: log, count, go on
                self.health.error("alert_tick_error")
                logger.exception("alert tick failed")


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
        """Stop (clean offline state, final flush) and join the thread (bounded)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"cloud service did not stop within {timeout} s")
        if self.error is not None:
            raise self.error


def _larger_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two snapshots of growing counters merged: the larger count of each (nested) key."""
    merged: dict[str, Any] = {}
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            merged[key] = _larger_counts(x, y)
        elif isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool) \
                and not isinstance(y, bool):
            merged[key] = max(x, y)
        else:
            merged[key] = y if key in b else x
    return merged
