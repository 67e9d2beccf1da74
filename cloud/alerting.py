"""The alert component: the rule engine wired to MQTT and storage.

Transitions from the engine are published (retained ``Alert`` on
``alerts/{d}/{rule}`` while active, an empty retained message when resolved),
stored in every sink, and the engine's state is saved in SQLite so open alerts
and ``for`` timers survive a restart. Acknowledgements requested from the CLI
arrive through the store's ``alert_acks`` queue. The cloud's own health (a sink
dropping points) is alerted on the instance's name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from cloud.alerts.engine import AlertEngine
from cloud.alerts.rules import Rule
from cloud.storage.sink import AlertEvent, TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from schemas.alerts import Alert
from schemas.base import Severity, now
from schemas.device import DeviceTelemetry, ModelMetrics
from schemas.topics import Topics

logger = logging.getLogger(__name__)

STATE_KEY = "alert_engine_state"
OUTBOX_KEY = "alert_outbox"
Publish = Callable[[str, bytes, bool], Awaitable[None]]
AlertKey = tuple[str, str]


@dataclass
class AlertChanges:
    """What one ingest batch persists for the alert component (taken on the loop)."""

    events: list[AlertEvent] = field(default_factory=list)
    snapshot: dict[str, object] | None = None
    outbox: list[list[str]] | None = None

    def __bool__(self) -> bool:
        return bool(self.events or self.snapshot is not None or self.outbox is not None)


class AlertComponent:
    """Owns ``alerts/#``.

    Every transition sets the retained state its topic should have (the alert,
    or empty once resolved) in an outbox that is persisted with the batch and
    published after the commit; an entry leaves the outbox only once the
    broker acknowledged it. After every (re)connection every active alert is
    published again, so retained alert topics never go stale, whatever was lost
    while the broker was unreachable or the service was down.
    """

    def __init__(self, rules: list[Rule], store: SqliteStore, topics: Topics, instance: str,
                 ) -> None:
        self.store = store
        self.topics = topics
        self.instance = instance
        snapshot = store.get(STATE_KEY)
        if snapshot:
            self.engine = AlertEngine.restore(rules, snapshot, instance=instance)
            logger.info("alert engine restored: %d open alert(s)", len(self.engine.active()))
        else:
            self.engine = AlertEngine(rules, instance=instance)
        self.engine.resume(now())  # the cloud's own downtime is not device silence
        self.pending: list[AlertEvent] = []
        self.outbox: dict[AlertKey, bytes] = {}
        for device_id, rule, payload in store.get(OUTBOX_KEY) or []:
            self.outbox[(device_id, rule)] = payload.encode()
        for alert in self.engine.dropped_on_restore:  # rules removed: clear their topics
            self.outbox[(alert.device_id, alert.rule)] = b""
        self._dirty = bool(self.engine.dropped_on_restore)
        self._outbox_dirty = False
        self._health_open: dict[str, Alert] = {}
        self.published = 0
        self.ticks = 0

    def observe_telemetry(self, telemetry: DeviceTelemetry, site: str | None) -> list[AlertEvent]:
        """Evaluate threshold rules on telemetry."""
        return self._keep(self.engine.observe_telemetry(telemetry, site=site, received_at=now()))

    def observe_model_metrics(self, metrics: ModelMetrics, site: str | None,
                              ) -> list[AlertEvent]:
        """Evaluate threshold rules on model metrics."""
        return self._keep(self.engine.observe_model_metrics(metrics, site=site))

    def device_stopped(self, device_id: str, at: float) -> list[AlertEvent]:
        """A device announced a clean shutdown: it is not silent, it is stopped."""
        return self._keep(self.engine.device_stopped(device_id, at))

    def resume(self) -> None:
        """After a reconnect: count silence from now, not from before the outage."""
        self.engine.resume(now())

    def on_connected(self) -> None:
        """Publish every active alert again (retained topics may be stale or lost)."""
        for alert in self.engine.active():
            key = (alert.device_id, alert.rule)
            if key not in self.outbox:
                self.outbox[key] = alert.to_json()
        for rule, alert in self._health_open.items():
            self.outbox.setdefault((self.instance, rule), alert.to_json())

    async def tick(self) -> list[AlertEvent]:
        """Absence rules, and acknowledgements queued by the CLI (read off the loop)."""
        events = self.engine.tick(now())
        self.ticks += 1
        self._dirty = True  # `for` timers move even without transitions
        rows = await asyncio.to_thread(
            self.store.query, "SELECT id, device_id, rule, by FROM alert_acks")
        done = []
        for row in rows:
            event = self.engine.acknowledge(row["device_id"], row["rule"], row["by"])
            if event is not None:
                events.append(event)
            done.append(int(row["id"]))
        if done:
            await asyncio.to_thread(self._delete_acks, done)
        return self._keep(events)

    def _delete_acks(self, ids: list[int]) -> None:
        with self.store.transaction() as db:
            db.executemany("DELETE FROM alert_acks WHERE id=?", [(i,) for i in ids])

    def health(self, rule: str, problem: str | None, value: float | None = None,
               ) -> list[AlertEvent]:
        """Open (``problem``) or resolve (None) an alert on the cloud's own health."""
        open_alert = self._health_open.get(rule)
        if problem is not None and open_alert is None:
            at = now()
            alert = Alert(device_id=self.instance, rule=rule, severity=Severity.CRITICAL,
                          metric=f"cloud.{rule}", value=value, message=problem[:1024],
                          opened_at=at, ts=at)
            self._health_open[rule] = alert
            return self._keep([AlertEvent(alert, "opened", at)])
        if problem is None and open_alert is not None:
            del self._health_open[rule]
            return self._keep([AlertEvent(open_alert, "resolved", now())])
        return []

    def _keep(self, events: list[AlertEvent]) -> list[AlertEvent]:
        for event in events:
            topic_key, payload = self.publication(event)
            self.outbox[topic_key] = payload
        if events:
            self.pending.extend(events)
            self._dirty = True
            self._outbox_dirty = True
        return events

    def publication(self, event: AlertEvent) -> tuple[AlertKey, bytes]:
        """The retained state a transition leaves on ``alerts/{d}/{rule}``."""
        key = (event.alert.device_id, event.alert.rule)
        if event.transition == "resolved":
            return key, b""
        state: Literal["firing", "acknowledged"] = (
            "acknowledged" if event.transition == "acknowledged" else "firing")
        alert = event.alert.model_copy(update={"state": state, "ts": event.at})
        return key, alert.to_json()

    # -- persistence: taken on the loop, written by the ingest writer -------------------

    def take_changes(self) -> AlertChanges:
        """Transitions, engine snapshot and outbox to store with the next batch."""
        changes = AlertChanges(self.pending)
        self.pending = []
        if self._dirty:
            changes.snapshot = self.engine.snapshot()
            self._dirty = False
        if self._outbox_dirty:
            changes.outbox = [[d, r, p.decode()] for (d, r), p in sorted(self.outbox.items())]
            self._outbox_dirty = False
        return changes

    def has_changes(self) -> bool:
        """Whether a batch has anything of this component's to store."""
        return bool(self.pending) or self._dirty or self._outbox_dirty

    def restore_changes(self, changes: AlertChanges) -> None:
        """Put back what a failed batch did not store."""
        self.pending = changes.events + self.pending
        self._dirty = self._dirty or changes.snapshot is not None
        self._outbox_dirty = self._outbox_dirty or changes.outbox is not None

    def write_changes(self, changes: AlertChanges, sinks: list[TelemetrySink]) -> None:
        """Store transitions and state (on the writer thread, inside its transaction)."""
        for sink in sinks:
            sink.write_alert_events(changes.events)
        if changes.snapshot is not None:
            self.store.put(STATE_KEY, changes.snapshot)
        if changes.outbox is not None:
            self.store.put(OUTBOX_KEY, changes.outbox)

    async def publish_outbox(self, publish: Publish) -> None:
        """Publish retained alert states; raises CloudOffline and keeps the rest."""
        for key, payload in list(self.outbox.items()):
            await publish(self.topics.alert(*key), payload, True)
            self.published += 1
            if self.outbox.get(key) is payload:
                del self.outbox[key]
                self._outbox_dirty = True
