"""Ingest: what devices publish, validated at the boundary, into registry, alerts, storage.

Every message is decoded with its schemas/ model; a bad one is counted per
reason and logged, and never reaches storage. Valid telemetry and metrics are
batched and written to every sink from a worker thread; duplicates (QoS 1
redelivery, offline-buffer replays) are stored once by the sinks' keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from cloud.alerting import AlertComponent
from cloud.errors import IngestRefused
from cloud.registry import DeviceRegistry
from cloud.settings import CloudSettings
from cloud.storage.sink import AlertEvent, TelemetrySink
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
REPORT_REQUEST_EVERY_S = 60.0
INGESTED_KINDS = frozenset({TopicKind.TELEMETRY, TopicKind.MODEL_METRICS,
                            TopicKind.DEVICE_STATE, TopicKind.DEPLOYMENT_STATUS,
                            TopicKind.COMMAND_REPLY})
"""Device -> cloud JSON topics this component owns; their models come from the catalog."""


@dataclass
class Pending:
    """What the writer stores next."""

    telemetry: list[DeviceTelemetry] = field(default_factory=list)
    metrics: list[ModelMetrics] = field(default_factory=list)
    deployments: list[DeploymentStatus] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.telemetry) + len(self.metrics) + len(self.deployments) + len(self.alerts)


class Ingest:
    """Owns the device -> cloud topics."""

    def __init__(self, settings: CloudSettings, topics: Topics, registry: DeviceRegistry,
                 alerts: AlertComponent, sinks: list[TelemetrySink], publish: Publish,
                 counters: Counter[str]) -> None:
        self.settings = settings
        self.topics = topics
        self.registry = registry
        self.alerts = alerts
        self.sinks = sinks
        self.publish = publish
        self.counters = counters
        self.pending = Pending()
        self.stored = 0
        self._wake = asyncio.Event()
        self._last_report_request: dict[str, float] = {}
        self._provisioned = set(settings.ingest.provisioned)
        self._metrics_seq: dict[tuple[str, str], int] = {}

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

    async def handle(self, parsed: ParsedTopic, payload: bytes) -> None:
        """Route one device message (called by the service's dispatcher)."""
        try:
            message = self.decode(parsed, payload)
        except IngestRefused as exc:
            self.counters[f"refused_{exc.reason}"] += 1
            logger.warning("refused %s from %s: %s", parsed.kind.value, parsed.device_id, exc)
            return
        self.counters[f"accepted_{parsed.kind.value}"] += 1
        if isinstance(message, DeviceTelemetry):
            await self._telemetry(message)
        elif isinstance(message, ModelMetrics):
            key = (message.device_id, message.session_id)
            if message.seq <= self._metrics_seq.get(key, -1):
                self.counters["duplicate_model_metrics"] += 1
                return
            self._metrics_seq[key] = message.seq
            site = self._site(message.device_id)
            self.pending.metrics.append(message)
            self.alerts.observe_model_metrics(message, site)
        elif isinstance(message, DeviceState):
            self.registry.on_state(message)
        elif isinstance(message, DeploymentStatus):
            self.registry.on_deployment(message)
            self.pending.deployments.append(message)
        elif isinstance(message, CommandResult):
            logger.debug("%s answered %s: %s", message.device_id, message.command,
                         message.status.value)
        if len(self.pending) + len(self.alerts.pending) >= self.settings.ingest.batch_max \
                or self.alerts.pending:
            self._wake.set()

    async def _telemetry(self, telemetry: DeviceTelemetry) -> None:
        check = self.registry.on_telemetry(telemetry)
        if check.duplicate:  # QoS 1 redelivery or a replay: every sink stores it once
            self.counters["duplicate_telemetry"] += 1
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
        await self.publish(self.topics.command(device_id, "report_now"), command.to_json(),
                           False)

    def _site(self, device_id: str) -> str | None:
        record = self.registry.get(device_id)
        return record.site if record else None

    # -- writer -------------------------------------------------------------------

    async def writer(self) -> None:
        """Write batches to every sink off the event loop, forever."""
        interval = self.settings.ingest.flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.flush()
            except (sqlite3.Error, OSError):
                # Keep serving; the batch is back in front of the queue for the next try.
                self.counters["store_error"] += 1
                logger.exception("storing a batch failed; retrying")
                await asyncio.sleep(min(5.0, interval * 10))

    async def flush(self) -> None:
        """Publish alert transitions and store what is pending (restored on failure)."""
        batch, self.pending = self.pending, Pending()
        batch.alerts, self.alerts.pending = self.alerts.pending, []
        for event in batch.alerts:
            topic, payload, retain = self.alerts.publication(event)
            await self.publish(topic, payload, retain)
        if not (batch or self.registry_dirty()):
            return
        try:
            await asyncio.to_thread(self._write, batch)
        except (sqlite3.Error, OSError):
            self.pending = Pending(batch.telemetry + self.pending.telemetry,
                                   batch.metrics + self.pending.metrics,
                                   batch.deployments + self.pending.deployments,
                                   [])
            self.alerts.pending = batch.alerts + self.alerts.pending
            raise
        self.stored += len(batch.telemetry) + len(batch.metrics)

    def registry_dirty(self) -> bool:
        """Whether registry records wait to be saved."""
        return bool(self.registry._dirty)

    def _write(self, batch: Pending) -> None:
        sites = {d.device_id: d.site for d in self.registry.devices() if d.site}
        for sink in self.sinks:
            sink.write_telemetry(batch.telemetry, sites=sites)
            sink.write_model_metrics(batch.metrics, sites=sites)
            sink.write_deployment_status(batch.deployments)
            sink.write_alert_events(batch.alerts)
        self.registry.persist()
        self.alerts.save_state()
