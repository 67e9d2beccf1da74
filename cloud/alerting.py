"""The alert component: the rule engine wired to MQTT and storage.

Transitions from the engine are published (retained ``Alert`` on
``alerts/{d}/{rule}`` while active, an empty retained message when resolved),
stored in every sink, and the engine's state is saved in SQLite so open alerts
and ``for`` timers survive a restart. Acknowledgements requested from the CLI
arrive through the store's ``alert_acks`` queue. The cloud's own health (a sink
dropping points) is alerted on the instance's name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from cloud.alerts.engine import AlertEngine
from cloud.alerts.rules import Rule
from cloud.storage.sink import AlertEvent
from cloud.storage.sqlite_store import SqliteStore
from schemas.alerts import Alert
from schemas.base import Severity, now
from schemas.device import DeviceTelemetry, ModelMetrics
from schemas.topics import Topics

logger = logging.getLogger(__name__)

STATE_KEY = "alert_engine_state"
Publish = Callable[[str, bytes, bool], Awaitable[None]]


class AlertComponent:
    """Owns ``alerts/#``."""

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
        self._dirty = False
        self._health_open: dict[str, Alert] = {}

    def observe_telemetry(self, telemetry: DeviceTelemetry, site: str | None) -> list[AlertEvent]:
        """Evaluate threshold rules on telemetry."""
        return self._keep(self.engine.observe_telemetry(telemetry, site=site, received_at=now()))

    def observe_model_metrics(self, metrics: ModelMetrics, site: str | None,
                              ) -> list[AlertEvent]:
        """Evaluate threshold rules on model metrics."""
        return self._keep(self.engine.observe_model_metrics(metrics, site=site))

    def resume(self) -> None:
        """After a reconnect: count silence from now, not from before the outage."""
        self.engine.resume(now())

    def tick(self) -> list[AlertEvent]:
        """Absence rules, and acknowledgements queued by the CLI."""
        events = self.engine.tick(now())
        self._dirty = True  # `for` timers move even without transitions
        for row in self.store.query("SELECT id, device_id, rule, by FROM alert_acks"):
            event = self.engine.acknowledge(row["device_id"], row["rule"], row["by"])
            if event is not None:
                events.append(event)
            with self.store.transaction() as db:
                db.execute("DELETE FROM alert_acks WHERE id=?", (row["id"],))
        return self._keep(events)

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
        if events:
            self.pending.extend(events)
            self._dirty = True
        return events

    def publication(self, event: AlertEvent) -> tuple[str, bytes, bool]:
        """(topic, payload, retain) for a transition."""
        topic = self.topics.alert(event.alert.device_id, event.alert.rule)
        if event.transition == "resolved":
            return topic, b"", True
        state: Literal["firing", "acknowledged"] = (
            "acknowledged" if event.transition == "acknowledged" else "firing")
        alert = event.alert.model_copy(update={"state": state, "ts": event.at})
        return topic, alert.to_json(), True

    def save_state(self) -> None:
        """Persist the engine's state when something changed."""
        if self._dirty:
            self.store.put(STATE_KEY, self.engine.snapshot())
            self._dirty = False
