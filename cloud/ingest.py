"""Ingest: what devices publish, validated at the boundary, into registry, alerts, storage.

Every message is decoded with its schemas/ model; a bad one is counted per
reason and logged, and never reaches storage. Valid telemetry and metrics are
batched and written to every sink from a worker thread; duplicates (QoS 1
redelivery, offline-buffer replays) are stored once by the sinks' keys.

Nothing is acknowledged before it is stored: every message, accepted or
refused, joins the batch being built, and its PUBACK is sent only after that
batch (and every batch before it) is committed. A message seen twice is
acknowledged after the batch holding its first copy. If the commit fails, the
batch stays in front of the queue and is tried again; if the process dies,
the broker delivers what was not acknowledged again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cloud.alerting import AlertChanges, AlertComponent
from cloud.errors import CloudOffline, IngestRefused
from cloud.health import STATE_KEY as HEALTH_KEY
from cloud.health import HealthCounters
from cloud.mqtt_link import Inbound
from cloud.offload import off_loop
from cloud.registry import DeviceRegistry, RegistryChanges
from cloud.settings import CloudSettings
from cloud.storage.sink import AlertEvent, TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from schemas.base import decode_message, now
from schemas.catalog import CHANNELS
from schemas.device import (
    Command,
    CommandResult,
    DeploymentStatus,
    DeviceState,
    DeviceTelemetry,
    ModelMetrics,
)
from schemas.errors import DecodeError
from schemas.topics import ParsedTopic, TopicKind, Topics, shared_filter

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], Awaitable[None]]
Ack = Callable[[Inbound], None]
Observer = Callable[[Sequence[DeploymentStatus], Sequence[AlertEvent]], None]
REPORT_REQUEST_EVERY_S = 60.0
ROW_ERRORS = (OverflowError, ValueError, TypeError, sqlite3.IntegrityError,
              sqlite3.InterfaceError, sqlite3.DataError)
"""What a store raises for one row's content (not for the disk or the database)."""
RETRY_MAX_S = 5.0
INGESTED_KINDS = frozenset({TopicKind.TELEMETRY, TopicKind.MODEL_METRICS,
                            TopicKind.DEVICE_STATE, TopicKind.DEPLOYMENT_STATUS,
                            TopicKind.COMMAND_REPLY})
"""Device -> cloud JSON topics this component owns; their models come from the catalog."""


@dataclass
class Pending:
    """What the writer stores next, and the messages it acknowledges after the commit."""

    telemetry: list[DeviceTelemetry] = field(default_factory=list)
    metrics: list[ModelMetrics] = field(default_factory=list)
    deployments: list[DeploymentStatus] = field(default_factory=list)
    acks: list[Inbound] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.telemetry) + len(self.metrics) + len(self.deployments)


@dataclass
class Batch:
    """One commit: messages, registry and alert changes taken at the same moment."""

    pending: Pending
    registry: RegistryChanges
    alerts: AlertChanges
    sites: dict[str, str]
    health: dict[str, Any]



class Ingest:
    """Owns the device -> cloud topics and the writer of their batches."""

    def __init__(self, settings: CloudSettings, topics: Topics, registry: DeviceRegistry,
                 alerts: AlertComponent, store: SqliteStore, sinks: list[TelemetrySink],
                 publish: Publish, ack: Ack, health: HealthCounters) -> None:
        self.settings = settings
        self.topics = topics
        self.registry = registry
        self.alerts = alerts
        self.store = store
        self.sinks = sinks
        self.publish = publish
        self.ack = ack
        self.health = health
        self.counters = health.flat
        self.pending = Pending()
        self.stored = 0
        self.batches = 0
        self._wake = asyncio.Event()
        self._last_report_request: dict[str, float] = {}
        self._provisioned = set(settings.ingest.provisioned)
        self._metrics_seq: dict[tuple[str, str], int] = {}
        self.observers: list[Observer] = []
        """Called on the loop after each commit with its deployment statuses and alert
        transitions (the rollout manager watches them)."""

    def filters(self) -> list[str]:
        """Subscriptions: telemetry and metrics shared between instances when configured."""
        group = self.settings.mqtt.shared_group
        shared = [self.topics.filter(TopicKind.TELEMETRY),
                  self.topics.filter(TopicKind.MODEL_METRICS)]
        if group:
            shared = [shared_filter(group, f) for f in shared]
        return [*shared, self.topics.filter(TopicKind.DEVICE_STATE),
                self.topics.filter(TopicKind.DEPLOYMENT_STATUS),
                self.topics.filter(TopicKind.COMMAND_REPLY)]

    # -- boundary ------------------------------------------------------------------

    def decode(self, parsed: ParsedTopic, payload: bytes) -> BaseModel:
        """Validate one payload for its topic; raises IngestRefused with a reason."""
        model = CHANNELS[parsed.kind].message
        if model is None:
            raise IngestRefused("unexpected_topic", f"{parsed.kind.value} carries no JSON")
        try:
            message = decode_message(model, payload,
                                     max_bytes=self.settings.ingest.max_payload_bytes)
        except DecodeError as exc:
            raise IngestRefused(exc.reason, exc.detail) from None
        device_id = getattr(message, "device_id", None)
        if device_id != parsed.device_id:
            raise IngestRefused("device_mismatch",
                                f"payload says {device_id!r}, topic says {parsed.device_id!r}")
        if parsed.device_id and self.settings.ingest.require_registration \
                and parsed.device_id not in self._provisioned:
            raise IngestRefused("unknown_device", f"{parsed.device_id} is not provisioned")
        ts = getattr(message, "ts", None)
        if ts is not None and ts > now() + self.settings.ingest.max_future_skew_s:
            raise IngestRefused("future_timestamp", f"ts {ts:.0f} is ahead of the cloud's clock")
        return message

    def refuse(self, message: Inbound, kind: str, reason: str, detail: str) -> None:
        """Count a refusal and acknowledge it with the next batch (never stored).

        The first refusal of each (kind, reason) is logged as a warning, later ones
        at debug level: a flood must not flood the log too; the counters say it all.
        """
        first = self.health.refused[kind][reason] == 0
        self.health.refuse(kind, reason)
        (logger.warning if first else logger.debug)(
            "refused message on %s: %s: %s", message.topic, reason, detail[:300])
        self.acknowledge_later(message)

    def acknowledge_later(self, message: Inbound) -> None:
        """Acknowledge ``message`` once everything received before it is committed."""
        self.pending.acks.append(message)
        self._maybe_wake()

    async def handle(self, parsed: ParsedTopic, inbound: Inbound) -> None:
        """Route one device message (called by the service's dispatcher)."""
        try:
            message = self.decode(parsed, inbound.payload)
        except IngestRefused as exc:
            self.refuse(inbound, parsed.kind.value, exc.reason, exc.detail)
            return
        if isinstance(message, DeviceState):
            verdict = self.registry.on_state(
                message, retained=inbound.retain,
                max_skew_s=self.settings.ingest.max_future_skew_s)
            if verdict in ("stale_birth", "birth_out_of_time"):
                self.refuse(inbound, parsed.kind.value, verdict,
                            f"bd_seq {message.bd_seq}, ts {message.ts:.0f}")
                return
            if verdict == "applied" and message.state == "offline" \
                    and message.reason == "shutdown":
                self.alerts.device_stopped(message.device_id, message.ts)
        # Every message is counted once: accepted, refused or rate-limited (a duplicate
        # is an accepted message that was already stored).
        self.health.accept(parsed.kind.value)
        if isinstance(message, DeviceTelemetry):
            await self._telemetry(message)
        elif isinstance(message, ModelMetrics):
            key = (message.device_id, message.session_id)
            if message.seq <= self._metrics_seq.get(key, -1):
                self.health.duplicate(parsed.kind.value)
            else:
                self._metrics_seq[key] = message.seq
                self.pending.metrics.append(message)
                self.alerts.observe_model_metrics(message, self._site(message.device_id))
        elif isinstance(message, DeploymentStatus):
            self.registry.on_deployment(message)
            self.pending.deployments.append(message)
        elif isinstance(message, CommandResult):
            logger.debug("%s answered %s: %s", message.device_id, message.command,
                         message.status.value)
        self.acknowledge_later(inbound)

    def _maybe_wake(self) -> None:
        if len(self.pending) + len(self.pending.acks) // 4 >= self.settings.ingest.batch_max \
                or self.alerts.pending:
            self._wake.set()

    async def _telemetry(self, telemetry: DeviceTelemetry) -> None:
        check = self.registry.on_telemetry(telemetry)
        if check.duplicate:  # QoS 1 redelivery or a replay: every sink stores it once
            self.health.duplicate(TopicKind.TELEMETRY.value)
            return
        self.pending.telemetry.append(telemetry)
        self.alerts.observe_telemetry(telemetry, self._site(telemetry.device_id))
        # With a shared group each instance sees part of a device's sequence: no gaps.
        if check.gap and self.settings.ingest.request_report_on_gap \
                and not self.settings.mqtt.shared_group:
            await self._request_report(telemetry.device_id, check.gap)

    async def _request_report(self, device_id: str, gap: int) -> None:
        last = self._last_report_request.get(device_id, 0.0)
        if time.monotonic() - last < REPORT_REQUEST_EVERY_S:
            return
        self._last_report_request[device_id] = time.monotonic()
        logger.info("%s: %d telemetry message(s) missing; asking it to report", device_id, gap)
        command = Command(correlation_id=f"gap-{secrets.token_hex(6)}", ts=now(),
                          args={"missing": gap})
        try:
            await self.publish(self.topics.command(device_id, "report_now"), command.to_json(),
                               False)
        except CloudOffline as exc:
            self.health.error("report_request_not_sent")
            logger.info("report request to %s not sent: %s", device_id, exc)

    def _site(self, device_id: str) -> str | None:
        record = self.registry.get(device_id)
        return record.site if record else None

    # -- writer -------------------------------------------------------------------

    async def writer(self) -> None:
        """Commit batches off the event loop, acknowledge, publish alerts; forever.

        Any error keeps the batch (it is retried, with a growing pause); the loop
        ends only when cancelled.
        """
        interval = self.settings.ingest.flush_interval_s
        failures = 0
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the one handler of this loop: the batch is kept, retried
                failures += 1
                self.health.error("store_error")
                logger.exception("storing a batch failed (%d in a row); retrying", failures)
                await asyncio.sleep(min(RETRY_MAX_S, interval * 2 ** min(failures, 10)))
            else:
                failures = 0
            await self.publish_alerts()

    def _take(self) -> Batch:
        """Everything to commit next; taken in one step on the loop, so it is consistent."""
        sites = {d.device_id: d.site for d in self.registry.devices() if d.site}
        batch = Batch(self.pending, self.registry.take_changes(), self.alerts.take_changes(),
                      sites, self.health.snapshot())
        self.pending = Pending()
        return batch

    def _restore(self, batch: Batch) -> None:
        pending = self.pending
        self.pending = Pending(batch.pending.telemetry + pending.telemetry,
                               batch.pending.metrics + pending.metrics,
                               batch.pending.deployments + pending.deployments,
                               batch.pending.acks + pending.acks)
        self.registry.restore_changes(batch.registry)
        self.alerts.restore_changes(batch.alerts)

    async def flush(self) -> None:
        """Commit what is pending, then acknowledge its messages (restored on failure)."""
        if not (len(self.pending) or self.pending.acks or self.registry.pending_changes()
                or self.alerts.has_changes()):
            return
        batch = self._take()
        try:
            refused = await off_loop(self._write, batch)
        except BaseException:
            # Cancelled or failed: nothing was acknowledged; the writes are idempotent,
            # so committing the same batch again later is harmless.
            self._restore(batch)
            raise
        for message in batch.pending.acks:
            self.ack(message)
        if batch.pending.deployments or batch.alerts.events:
            for observer in self.observers:
                observer(batch.pending.deployments, batch.alerts.events)
        if refused:
            self.health.errors["store_refused_row"] += refused
            self.counters["refused_store_error"] += refused
        self.health.store(TopicKind.TELEMETRY.value, len(batch.pending.telemetry))
        self.health.store(TopicKind.MODEL_METRICS.value, len(batch.pending.metrics))
        self.health.store(TopicKind.DEPLOYMENT_STATUS.value, len(batch.pending.deployments))
        self.stored += len(batch.pending.telemetry) + len(batch.pending.metrics) - refused
        self.batches += 1

    async def publish_alerts(self) -> None:
        """Publish the alert outbox (what is not acknowledged stays for the next try)."""
        if not self.alerts.outbox:
            return
        try:
            await self.alerts.publish_outbox(self.publish)
        except CloudOffline as exc:
            self.health.error("alert_publish_deferred")
            logger.info("alert publication deferred: %s", exc)

    def _write(self, batch: Batch) -> int:
        """One transaction in SQLite; buffered sinks (InfluxDB) get the same rows.

        A row the store refuses for its content (a value it cannot hold) is refused
        alone, never the rest of the batch; any other error (disk, I/O) fails the
        whole batch, which is then kept and tried again. Returns the rows refused.
        """
        sites = batch.sites
        pending = batch.pending
        with self.store.transaction():
            kept, refused = self._store_rows(pending, sites)
            for sink in self.sinks:
                if sink is self.store:
                    continue
                sink.write_telemetry(kept.telemetry, sites=sites)
                sink.write_model_metrics(kept.metrics, sites=sites)
                sink.write_deployment_status(kept.deployments)
            self.alerts.write_changes(batch.alerts, self.sinks)
            self.registry.write_changes(batch.registry)
            self.store.put(HEALTH_KEY, batch.health)
        return refused

    def _store_rows(self, pending: Pending, sites: dict[str, str]) -> tuple[Pending, int]:
        """The batch's rows into SQLite; on a content error, row by row (savepoints)."""
        store = self.store
        try:
            with store.transaction():
                store.write_telemetry(pending.telemetry, sites=sites)
                store.write_model_metrics(pending.metrics, sites=sites)
                store.write_deployment_status(pending.deployments)
        except ROW_ERRORS as exc:
            logger.warning("a batch of %d row(s) was refused (%s); storing row by row",
                           len(pending), exc)
        else:
            return pending, 0
        kept = Pending()
        refused = 0
        for rows, write, out in (
                (pending.telemetry, store.write_telemetry, kept.telemetry),
                (pending.metrics, store.write_model_metrics, kept.metrics)):
            for row in rows:
                try:
                    with store.transaction():
                        write([row], sites=sites)  # type: ignore[list-item]
                except ROW_ERRORS as exc:
                    refused += 1
                    logger.warning("refused to store a row of %s: %s", row.device_id, exc)
                else:
                    out.append(row)  # type: ignore[arg-type]
        for status in pending.deployments:
            try:
                with store.transaction():
                    store.write_deployment_status([status])
            except ROW_ERRORS as exc:
                refused += 1
                logger.warning("refused to store a status of %s: %s", status.device_id, exc)
            else:
                kept.deployments.append(status)
        return kept, refused
