"""The edge agent: one MQTT session and the components that share it.

Threads: the session's network thread (paho) only decodes topics and enqueues;
the agent thread runs commands, telemetry and store-and-forward; the OTA thread
installs models. Applications call :meth:`EdgeAgent.infer` from their own
threads.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import JsonValue

from edge_node import __version__
from edge_node.commands import CommandRouter, Reply
from edge_node.counters import Counters
from edge_node.errors import EdgeError, InferenceError, PacketTooLargeError
from edge_node.inference import available_runtimes, supported_formats
from edge_node.inference_service import InferenceService
from edge_node.model_store import ModelStore
from edge_node.offline_buffer import OfflineBuffer
from edge_node.ota import Capabilities, OtaManager
from edge_node.release_verify import load_trusted_keys
from edge_node.session import ACCEPTED, MqttSession
from edge_node.settings import EdgeSettings
from edge_node.system_metrics import SystemSample, hardware_info, sample
from schemas.base import decode_message, now
from schemas.device import (
    CommandResult,
    CommandStatus,
    DeploymentStatus,
    DeviceState,
    DeviceTelemetry,
    ModelMetrics,
)
from schemas.errors import DecodeError, TopicError
from schemas.release import ReleaseManifest
from schemas.topics import TopicKind, Topics

logger = logging.getLogger(__name__)

Sampler = Callable[[], SystemSample]
DRAIN_BATCH = 100
MAX_INFLIGHT = 500
"""Outbox messages handed to paho and not yet acknowledged, at most."""
ACK_SWEEP_S = 0.2
"""The agent thread deletes acknowledged messages and drains at least this often."""


class EdgeAgent:
    """One device's agent.

    Args:
        settings: the agent's settings.
        sampler: psutil reading (the fleet simulator passes a shared, jittered one).
    """

    def __init__(self, settings: EdgeSettings, *, sampler: Sampler | None = None) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = Topics(settings.topic_root)
        self.state_dir = settings.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.session_id = secrets.token_hex(8)
        self.sampler = sampler or (lambda: sample(self.state_dir))
        self.counters = Counters()
        self.interval_s = settings.telemetry.interval_s
        self.telemetry_seq = 0
        self.metrics_seq = 0
        self.runtimes = available_runtimes()
        self.formats = supported_formats()
        self.hardware = hardware_info(self.state_dir)
        self.buffer = OfflineBuffer(self.state_dir / "outbox.sqlite3",
                                    max_messages=settings.buffer.max_messages,
                                    max_bytes=settings.buffer.max_bytes,
                                    durable=settings.buffer.durable)
        self._ack_lock = threading.Lock()
        self._acked: list[int] = []
        self._refused_acks = 0
        self._disk_failing = False
        """The outbox's disk refused the last write (full, read-only, failing)."""
        self._handed_upto = (self.buffer.first_id - 1 if len(self.buffer)
                             else self.buffer.last_id)

        """Outbox ids up to this one were handed to paho in this process (paho re-sends
        them after a reconnect); newer ones wait for the drain."""
        self._inflight = 0
        self._handed_early: set[int] = set()
        """Outbox ids above ``_handed_upto`` handed ahead of the paced backlog."""
        self._draining = False
        self._drain_tokens = float(DRAIN_BATCH)
        self._drain_at = time.monotonic()
        self.inference = InferenceService(max_samples=settings.telemetry.latency_samples,
                                          window_s=settings.telemetry.metrics_window_s)
        self.store = ModelStore(self.state_dir / "models")
        self.session = MqttSession(settings, self.topics, birth=self._birth,
                                   on_message=self._on_message,
                                   on_connected=lambda: self._events.put(("connected", None)),
                                   counters=self.counters)
        self.ota = OtaManager(
            device_id=self.device_id, topics=self.topics, store=self.store,
            inference=self.inference, settings=settings.ota,
            keys=load_trusted_keys(settings.ota.trusted_keys, settings.ota.trusted_key_files),
            capabilities=Capabilities(
                formats=frozenset(self.formats), runtimes=frozenset(self.runtimes),
                gpu=self.hardware.gpu,
                available_memory_mb=lambda: self.sampler().memory_available_mb,
                device_class=self.hardware.device_class(),
            ),
            publish_status=self._publish_status, chunk_subscriptions=self._chunk_subscriptions,
            counters=self.counters, threads=settings.agent_threads,
        )
        self.fl: Any = None
        if settings.fl.tasks:
            from edge_node.fl_client import FLClient  # torch only on devices that train

            self.fl = FLClient(self.device_id, self.topics, settings.fl,
                               publish=self.send,
                               subscribe=self._fl_subscription, counters=self.counters,
                               state_dir=self.state_dir / "fl")
        self.commands = CommandRouter(self.device_id, self.counters, self._send_reply)
        self._register_commands()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report_now = threading.Event()
        self.telemetry_published = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Serve the models on disk, then connect and start reporting."""
        restored = self.ota.restore()
        if restored:
            logger.info("%s: serving %s from disk", self.device_id, ", ".join(restored))
        self.session.subscribe(self.topics.filter(TopicKind.COMMAND, device_id=self.device_id))
        self.session.subscribe(self.topics.filter(TopicKind.RELEASE))
        if self.fl is not None:
            for topic_filter in self.fl.filters():
                self.session.subscribe(topic_filter)
            self.fl.start()
        self.ota.start()
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.device_id}",
                                        daemon=True)
        self._thread.start()
        self.session.start()

    def stop(self) -> None:
        """Publish ``offline`` (shutdown), disconnect, stop the threads, close files."""
        self._stop.set()
        self._events.put(("stop", None))
        if self._thread is not None:
            self._thread.join(10)
        self.ota.stop()
        if self.fl is not None:
            self.fl.stop()
        self._take_sends()  # what the job threads sent last goes to the outbox too
        self._flush_outbox(self.settings.mqtt.publish_timeout_s)
        offline = None
        if self.session.bd_seq >= 0:  # never connected: there is nothing to say offline
            offline = DeviceState(device_id=self.device_id, state="offline",
                                  bd_seq=self.session.bd_seq, ts=now(), reason="shutdown")
        self.session.stop(offline)
        try:
            self._sweep_acks()
        except sqlite3.Error as exc:  # the outbox keeps them: sent again at the next start
            logger.warning("%s: acknowledged messages not removed at stop: %s",
                           self.device_id, exc)
        self.inference.close()
        self.buffer.close()

    def run_forever(self, stop: threading.Event) -> None:
        """Start, wait for ``stop`` (Ctrl-C/SIGTERM handlers set it), then stop."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # -- birth -------------------------------------------------------------------

    def _birth(self, bd_seq: int) -> DeviceState:
        return DeviceState(
            device_id=self.device_id, state="online", bd_seq=bd_seq, ts=now(),
            agent_version=__version__, hardware=self.hardware,
            memory_available_mb=self.sampler().memory_available_mb,
            runtimes=self.runtimes, model_formats=self.formats, site=self.settings.site,
            fl_tasks=sorted(self.settings.fl.tasks), reason="birth",
        )

    # -- network thread: decode the topic, hand over -------------------------------

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except TopicError:
            self.counters.add("refused_topic")
            logger.warning("%s: message on unexpected topic %s", self.device_id, msg.topic)
            return
        payload = bytes(msg.payload)
        if parsed.kind is TopicKind.COMMAND and parsed.device_id == self.device_id:
            self._events.put(("command", (parsed.command, payload)))
        elif parsed.kind is TopicKind.RELEASE and parsed.model:
            self.ota.submit_release(parsed.model, payload)
        elif parsed.kind is TopicKind.CHUNK and parsed.model and parsed.version \
                and parsed.chunk is not None:
            self.ota.submit_chunk(parsed.model, parsed.version, parsed.chunk, payload)
        elif parsed.kind is TopicKind.ROUND_PLAN and self.fl is not None and parsed.task:
            self.fl.on_round_plan(parsed.task, payload)
        elif parsed.kind is TopicKind.GLOBAL_MODEL and self.fl is not None and parsed.task \
                and parsed.version:
            self.fl.on_global_weights(parsed.task, parsed.version, payload)
        elif parsed.kind in (TopicKind.SECAGG_BROADCAST, TopicKind.SECAGG_INBOX) \
                and self.fl is not None and parsed.task and parsed.round is not None \
                and parsed.stage and parsed.device_id in (None, self.device_id):
            self.fl.on_secagg(parsed.kind, parsed.task, parsed.round, parsed.stage, payload)
        else:
            self.counters.add("refused_topic")

    def _fl_subscription(self, topic: str, subscribe: bool) -> None:
        if subscribe:
            self.session.subscribe(topic)
        else:
            self.session.unsubscribe(topic)

    def _chunk_subscriptions(self, topics: list[str], subscribe: bool) -> None:
        if subscribe:
            self.session.subscribe_many(topics)
        else:  # also chunks an earlier run stored and left subscribed (resumed downloads)
            self.session.unsubscribe_many(topics, force=True)

    # -- agent thread ----------------------------------------------------------

    def _run(self) -> None:
        self.sampler()  # psutil keeps the CPU baseline per thread: prime it on this one
        next_report = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            timeout = max(0.0, next_report - time.monotonic())
            if self._inflight or self._acked or self._handed_upto < self.buffer.last_id:
                timeout = min(timeout, ACK_SWEEP_S)  # acknowledgements to sweep, a backlog
            try:
                kind, data = self._events.get(timeout=timeout)
            except queue.Empty:
                kind, data = "tick", None
            try:
                if kind == "stop":
                    break
                if kind == "connected":
                    self._draining = True
                    self._hand_urgent()
                elif kind == "command":
                    self.commands.dispatch(*data)
                elif kind == "report":
                    self.report()
                elif kind == "send":
                    self._store_and_forward(*data)
                self._sweep_acks()
                self._drain()
                if time.monotonic() >= next_report:
                    next_report = max(next_report + self.interval_s, time.monotonic())
                    self.report()
                    self.ota.check_probation()
            except (EdgeError, TimeoutError, OSError, ValueError, sqlite3.Error) as exc:
                # The one dispatcher of this loop: log, count, carry on.
                self.counters.add(f"agent_{getattr(exc, 'reason', type(exc).__name__)}")
                logger.exception("%s: %s failed", self.device_id, kind)

    def request_report(self) -> None:
        """Publish telemetry and metrics now (from any thread)."""
        self._events.put(("report", None))

    def report(self) -> None:
        """Measure and publish one DeviceTelemetry and one ModelMetrics per active model."""
        s = self.sampler()
        predictions, errors = self.inference.take_counts()
        counters = self.counters.snapshot()
        counters["buffer_evicted"] = self.buffer.evicted
        counters["buffer_queued"] = len(self.buffer)
        telemetry = DeviceTelemetry(
            device_id=self.device_id, session_id=self.session_id, seq=self.telemetry_seq,
            ts=now(), cpu_percent=s.cpu_percent, memory_percent=s.memory_percent,
            disk_percent=s.disk_percent, temperature_c=s.temperature_c,
            battery_percent=s.battery_percent, battery_plugged=s.battery_plugged,
            network_latency_ms=self.session.rtt_ms, prediction_count=predictions,
            error_count=errors, uptime_s=s.uptime_s, interval_s=self.interval_s,
            counters={k: v for k, v in sorted(counters.items())[:64] if _is_id(k)},
        )
        self.telemetry_seq += 1
        self._emit(self.topics.telemetry(self.device_id), telemetry)
        logger.info("%s: telemetry %d: cpu %.0f %%, memory %.0f %%, %d prediction(s)%s",
                    self.device_id, telemetry.seq, telemetry.cpu_percent,
                    telemetry.memory_percent, predictions,
                    "" if self.session.connected.is_set() else " (offline: in the outbox)")
        self.telemetry_published += 1
        for name in self.inference.names():
            self._report_model(name)

    def _report_model(self, name: str) -> None:
        model = self.inference.get(name)
        stats = self.inference.stats(name)
        if model is None or stats is None:
            return
        counts = self.inference.take_interval(name)
        metrics = ModelMetrics(
            device_id=self.device_id, model=name, version=model.installed.version,
            runtime=model.runtime.runtime, session_id=self.session_id, seq=self.metrics_seq,
            ts=now(), window_s=self.inference.window_s, sample_count=stats.samples,
            latency_ms_mean=stats.latency_ms_mean, latency_ms_p50=stats.latency_ms_p50,
            latency_ms_p95=stats.latency_ms_p95, latency_ms_p99=stats.latency_ms_p99,
            throughput_per_s=stats.throughput_per_s, memory_mb=model.memory_mb,
            cpu_percent=stats.cpu_percent, error_count=stats.errors,
            error_rate_percent=min(100.0, stats.error_rate_percent), accuracy=stats.accuracy,
            interval_count=counts[0], interval_errors=counts[1],
        )
        self.metrics_seq += 1
        self._emit(self.topics.model_metrics(self.device_id, name), metrics)

    # -- store and forward -------------------------------------------------------

    def _emit(self, topic: str, message: DeviceTelemetry | ModelMetrics) -> None:
        """Write to the outbox, then publish (now, or after what waits before it).

        The outbox holds every message until its PUBACK, so neither a broker outage
        nor a crash loses it. A message produced while offline is marked historical.
        A message the disk refuses is still published live when connected (counted,
        not durable); while offline it is lost, and counted.
        """
        connected = self.session.connected.is_set()
        queued = message if connected else message.model_copy(update={"historical": True})
        payload = queued.to_json()
        try:
            self.session.check_size(topic, payload)
        except PacketTooLargeError:
            self.counters.add("refused_packet_too_large")
            raise
        self._store_and_forward(topic, payload, retain=False)

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish through the outbox, from any thread (replies, deployment status, FL).

        The size is checked at once (PacketTooLargeError to the caller); the agent
        thread, the outbox's one owner, writes it and hands it to paho, so what is not
        yet acknowledged survives a broker outage, a disconnect and a restart.
        """
        self.session.check_size(topic, payload)
        if threading.current_thread() is self._thread:
            self._store_and_forward(topic, payload, retain=retain)
        else:
            self._events.put(("send", (topic, payload, retain)))

    def _take_sends(self) -> None:
        """At stop, once the agent thread has ended: move queued sends to the outbox."""
        while True:
            try:
                kind, data = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "send":
                try:
                    self._store_and_forward(*data)
                except (sqlite3.Error, EdgeError, ValueError, OSError) as exc:
                    self.counters.add("send_lost_at_stop")
                    logger.warning("%s: a message sent at stop was not stored: %s",
                                   self.device_id, exc)

    def _store_and_forward(self, topic: str, payload: bytes, retain: bool) -> None:
        """Append to the outbox and hand it to paho when nothing waits before it.

        A reply, a deployment status or an FL update does not wait behind a telemetry
        backlog: it is handed at once (out of order; its topic is its own) and the
        paced drain skips it later.
        """
        connected = self.session.connected.is_set()
        try:
            message_id, _ = self.buffer.append(topic, payload, retain=retain)
        except sqlite3.Error as exc:
            self._disk_error(f"outbox write failed ({exc}); "
                             + ("publishing without it" if connected else "message lost"))
            if connected:
                self.session.publish(topic, payload, retain=retain)
            else:
                self.counters.add("buffer_lost_disk_error")
            return
        except ValueError as exc:  # larger than the whole outbox: paho's queue holds it
            self.counters.add("buffer_message_over_cap")
            logger.warning("%s: %s; handed to the MQTT client without the outbox",
                           self.device_id, exc)
            self.session.publish(topic, payload, retain=retain)
            return
        self._disk_recovered()
        if not connected or self._inflight >= MAX_INFLIGHT:
            return
        if self._handed_upto == message_id - 1:
            self._hand(message_id, topic, payload, retain=retain)
        elif _urgent(topic):
            self._hand(message_id, topic, payload, retain=retain, early=True)

    def _hand_urgent(self) -> None:
        """After a (re)connection: what is not telemetry goes before the paced backlog."""
        for item in self.buffer.peek_urgent(after=self._handed_upto, limit=MAX_INFLIGHT):
            if item.id not in self._handed_early and self._inflight < MAX_INFLIGHT:
                self._hand(item.id, item.topic, item.payload, retain=item.retain, early=True)

    def _hand(self, message_id: int, topic: str, payload: bytes, *, retain: bool,
              early: bool = False) -> None:
        """Give one outbox message to paho (which re-sends it after a reconnect)."""
        if early:
            self._handed_early.add(message_id)
        else:
            self._handed_upto = message_id
        with self._ack_lock:
            self._inflight += 1
        self.session.publish(topic, payload, retain=retain,
                             on_ack=lambda code: self._on_ack(message_id, code))

    def _on_ack(self, message_id: int, code: int) -> None:
        """PUBACK (network thread): the message may leave the outbox."""
        with self._ack_lock:
            self._acked.append(message_id)
            self._inflight -= 1
            if code not in ACCEPTED:
                self._refused_acks += 1

    def _sweep_acks(self) -> None:
        """Delete acknowledged messages (batched, on the agent thread)."""
        with self._ack_lock:
            acked, self._acked = self._acked, []
            refused, self._refused_acks = self._refused_acks, 0
        if refused:  # refused ones leave too: resending would fail forever
            self.counters.add("buffer_refused_by_broker", refused)
        try:
            self.buffer.remove(acked)
        except sqlite3.Error as exc:
            # Kept for the next sweep; the rest of the tick (telemetry above all) goes on.
            with self._ack_lock:
                self._acked = acked + self._acked
            self._disk_error(f"acknowledged messages stay in the outbox ({exc})")
            return
        if acked:
            self._disk_recovered()

    def _disk_error(self, what: str) -> None:
        """The outbox's disk refused a write: counted each time, logged once per episode."""
        self.counters.add("buffer_disk_error")
        if not self._disk_failing:
            self._disk_failing = True
            logger.warning("%s: the disk refuses writes: %s; telemetry goes on, and the "
                           "counter buffer_disk_error says how often", self.device_id, what)

    def _disk_recovered(self) -> None:
        if self._disk_failing:
            self._disk_failing = False
            logger.info("%s: the outbox writes again", self.device_id)

    def _flush_outbox(self, timeout: float) -> None:
        """At a clean stop, while connected: send what waits and wait (bounded) for acks.

        Whatever is not acknowledged stays in the outbox and is sent at the next start.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while self.session.connected.is_set() and time.monotonic() < deadline:
            try:
                self._sweep_acks()
                self._drain()
            except (sqlite3.Error, EdgeError, OSError) as exc:
                logger.warning("%s: outbox not flushed at stop: %s", self.device_id, exc)
                return
            if self._inflight == 0 and self._handed_upto >= self.buffer.last_id:
                return
            pause.wait(0.01)

    def _drain(self) -> None:
        """Hand what waits in the outbox to paho, in order, paced.

        At most ``buffer.drain_rate_per_s`` messages a second (a burst of one batch):
        the cloud gives each device a budget, and a replay after a long outage must
        stay within it rather than be refused as a flood.
        """
        at = time.monotonic()
        rate = self.settings.buffer.drain_rate_per_s
        self._drain_tokens = min(float(DRAIN_BATCH),
                                 self._drain_tokens + (at - self._drain_at) * rate)
        self._drain_at = at
        while self.session.connected.is_set() and self._handed_upto < self.buffer.last_id \
                and self._inflight < MAX_INFLIGHT and self._drain_tokens >= 1.0:
            allowed = min(DRAIN_BATCH, MAX_INFLIGHT - self._inflight, int(self._drain_tokens))
            batch = self.buffer.peek(allowed, after=self._handed_upto)
            if not batch:
                self._handed_upto = self.buffer.last_id
                break
            handed = 0
            for item in batch:
                if item.id in self._handed_early:  # went ahead of the backlog already
                    self._handed_early.discard(item.id)
                    self._handed_upto = item.id
                    continue
                self._hand(item.id, item.topic, item.payload, retain=item.retain)
                handed += 1
            self._drain_tokens -= handed
            self._handed_early = {i for i in self._handed_early if i > self._handed_upto}
        if self._handed_upto >= self.buffer.last_id and self._draining:
            self._draining = False
            logger.info("%s: outbox handed over", self.device_id)

    # -- deployment status -------------------------------------------------------

    def _publish_status(self, status: DeploymentStatus) -> None:
        self.send(self.topics.deployment_status(self.device_id, status.model),
                  status.to_json(), retain=True)

    # -- inference API -------------------------------------------------------------

    def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        """Run local inference on an active model (for on-device applications)."""
        return self.inference.infer(model, batch)

    # -- commands ------------------------------------------------------------------

    def _send_reply(self, name: str, result: CommandResult) -> None:
        topic = self.topics.command_reply(self.device_id, name)
        try:
            self.send(topic, result.to_json())
        except PacketTooLargeError as exc:  # refused here, never sent to wedge the session
            self.counters.add("refused_packet_too_large")
            logger.warning("%s: reply to %s not sent: %s", self.device_id, name, exc)
            error = CommandResult(correlation_id=result.correlation_id,
                                  device_id=self.device_id, command=name, ts=now(),
                                  status=CommandStatus.ERROR, error=f"result too large: {exc}")
            self.send(topic, error.to_json())

    def _register_commands(self) -> None:
        router = self.commands
        router.register("ping", lambda args: {
            "pong": now(), "bd_seq": self.session.bd_seq, "session_id": self.session_id})
        router.register("report_now", self._cmd_report_now)
        router.register("set_telemetry_interval", self._cmd_set_interval)
        router.register_deferred("rollback", self._cmd_rollback)
        router.register("infer", self._cmd_infer)
        router.register_deferred("benchmark", self._cmd_benchmark)

    def _cmd_report_now(self, args: dict[str, Any]) -> dict[str, JsonValue]:
        self.report()
        return {"seq": self.telemetry_seq - 1}

    def _cmd_set_interval(self, args: dict[str, Any]) -> dict[str, JsonValue]:
        interval = args.get("interval_s")
        if isinstance(interval, bool) or not isinstance(interval, int | float) \
                or not 0.05 <= float(interval) <= 86_400:
            raise ValueError("interval_s must be a number of seconds in [0.05, 86400]")
        self.interval_s = float(interval)
        return {"interval_s": self.interval_s}

    def _cmd_rollback(self, args: dict[str, Any], reply: Reply) -> None:
        """Runs on the OTA thread; the agent thread goes on reporting meanwhile."""
        model = args.get("model")
        if not isinstance(model, str):
            reply(None, "args.model (the model name) is required")
            return
        reason = str(args.get("reason", "rollback requested by command"))

        def done(status: DeploymentStatus | None, error: BaseException | None) -> None:
            if status is None:
                reply(None, str(error) or type(error).__name__)
            else:
                reply({"active_version": status.active_version,
                       "previous_version": status.previous_version}, None)

        self.ota.submit_rollback(model, reason, done)

    def _cmd_benchmark(self, args: dict[str, Any], reply: Reply) -> None:
        """Runs on the OTA thread (download, verify, time); the agent goes on meanwhile."""
        try:
            manifest = decode_message(ReleaseManifest,
                                      json.dumps(args.get("manifest")).encode())
        except DecodeError as exc:
            reply(None, f"invalid_manifest: {exc.detail}")
            return
        options: dict[str, int] = {k: int(args[k]) for k in ("runs", "warmup", "threads", "batch")
                                   if k in args}
        self.ota.submit_benchmark(manifest, options, reply)

    def _cmd_infer(self, args: dict[str, Any]) -> dict[str, JsonValue]:
        model = args.get("model")
        inputs = args.get("inputs")
        if not isinstance(model, str) or not isinstance(inputs, list):
            raise TypeError("args.model (str) and args.inputs (nested list) are required")
        active = self.inference.get(model)
        if active is None:
            raise InferenceError(f"no model {model!r} is active")
        spec = active.runtime.inputs[0]
        dtype = np.dtype(spec.dtype) if spec.known else np.dtype(np.float32)
        try:
            batch = np.asarray(inputs, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise InferenceError(f"inputs are not a {dtype} array: {exc}") from None
        out = self.infer(model, batch)
        return {"outputs": out.tolist(), "version": active.installed.version}


def _urgent(topic: str) -> bool:
    """Whether a message goes ahead of a telemetry backlog (all but telemetry, metrics)."""
    return not topic.endswith(("/telemetry", "/metrics"))


def _is_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c.isalnum() or c in "_-" for c in text) and text.isascii()

