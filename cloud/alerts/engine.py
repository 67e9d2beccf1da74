"""The alert engine: rules in, alert transitions out. Pure logic, no I/O.

The cloud service feeds every validated telemetry and model-metrics message to
:class:`AlertEngine`, calls :meth:`AlertEngine.tick` periodically, and publishes
and stores the :class:`~cloud.storage.sink.AlertEvent` transitions it gets back
(retained :class:`~schemas.alerts.Alert` on ``alerts/{d}/{rule}`` when opened or
acknowledged, an empty retained message when resolved). It persists
:meth:`AlertEngine.snapshot` and rebuilds the engine with
:meth:`AlertEngine.restore` after a restart.

Semantics:

* An alert is keyed by ``(device_id, rule)`` - the alert topic is
  ``alerts/{d}/{rule}`` - so it opens once and staying over the threshold
  publishes nothing more. For a model-metrics rule, the alert carries the
  ``model`` and ``version`` that opened it; another model breaching the same
  rule on the same device meanwhile opens no second alert, and only samples of
  the opening model can resolve it (another model's breach, held meanwhile,
  opens the alert on its next breaching sample once the first one resolves).
* ``for_s`` / ``for_samples`` delay opening only: ``for_s`` is measured with
  message timestamps from the first sample of an unbroken breach, per
  ``(device, rule, model)``; a sample that does not breach restarts it. An
  alert resolves on the first sample on the good side of ``clear_threshold``.
* A ``None`` value (sensor missing, no latency yet) neither opens, resolves nor
  interrupts anything.
* Samples with ``historical=True`` (replayed from a device's offline buffer)
  neither open nor resolve threshold alerts nor move ``for`` timers: they
  describe the past. Historical telemetry still counts as "device seen".
* Absence rules are evaluated by :meth:`AlertEngine.tick` only, for devices
  whose telemetry was seen at least once; the alert resolves when telemetry
  seen later than the previous one arrives. Model metrics do not count.
* No wall clock is read: time comes from message timestamps and the ``now``
  given to :meth:`AlertEngine.tick`. The engine is not thread-safe; the caller
  serializes calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud.alerts.errors import AcknowledgeError, SnapshotError
from cloud.alerts.rules import AbsenceRule, Rule, ThresholdRule, check_unique
from cloud.storage.sink import AlertEvent
from schemas.alerts import Alert
from schemas.base import Id
from schemas.device import DeviceTelemetry, ModelMetrics

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT: Final = 1
MAX_MESSAGE_CHARS: Final = 1024
"""Alert.message limit; longer rendered messages are cut."""

_Key = tuple[str, str]
"""(device_id, rule)"""
_PendingKey = tuple[str, str, str]
"""(device_id, rule, model or "")"""


@dataclass(slots=True)
class _Pending:
    """An unbroken breach that has not yet held long enough to open."""

    since: float
    count: int


@dataclass(slots=True)
class _Device:
    """What absence rules know about one device."""

    last_seen: float
    interval_s: float
    watch_from: float | None = None
    stopped: bool = False
    """The device announced a clean shutdown: not silent until it reports again."""

    def silence(self, now: float) -> float:
        """Seconds without telemetry at ``now`` (from ``watch_from`` at the earliest)."""
        start = self.last_seen if self.watch_from is None else max(self.last_seen,
                                                                    self.watch_from)
        return now - start


class _PendingState(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    device_id: Id
    rule: Id
    model: Id | None = None
    since: float
    count: int = Field(ge=1)


class _DeviceState(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    device_id: Id
    last_seen: float
    interval_s: float = Field(gt=0)
    watch_from: float | None = None
    stopped: bool = False
    site: str | None = None


class _Snapshot(BaseModel):
    """The persisted engine state (JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal[1] = SNAPSHOT_FORMAT
    instance: str
    clock: float | None = None
    alerts: list[Alert] = Field(default_factory=list)
    pending: list[_PendingState] = Field(default_factory=list)
    devices: list[_DeviceState] = Field(default_factory=list)
    sites: dict[Id, str] = Field(default_factory=dict)


def _value(message: DeviceTelemetry | ModelMetrics, field: str) -> float | None:
    raw: object = getattr(message, field, None)
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw)
    return None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


class AlertEngine:
    """Evaluates alert rules on messages and returns alert transitions.

    Args:
        rules: the rules (names must be unique), usually from
            :func:`~cloud.alerts.rules.load_rules`.
        instance: the cloud instance name, kept in snapshots and logs.

    Raises:
        RuleError: two rules share a name.
    """

    def __init__(self, rules: Sequence[Rule], *, instance: str) -> None:
        check_unique(rules, "<AlertEngine rules>")
        self.instance = instance
        self._rules: tuple[Rule, ...] = tuple(rules)
        self._by_name: dict[str, Rule] = {r.name: r for r in rules}
        self._telemetry_rules = [
            r for r in rules if isinstance(r, ThresholdRule) and r.source == "telemetry"
        ]
        self._model_rules = [
            r for r in rules if isinstance(r, ThresholdRule) and r.source == "model_metrics"
        ]
        self._absence_rules = [r for r in rules if isinstance(r, AbsenceRule)]
        self._open: dict[_Key, Alert] = {}
        self._pending: dict[_PendingKey, _Pending] = {}
        self._devices: dict[str, _Device] = {}
        self._sites: dict[str, str] = {}
        self._clock: float | None = None
        self._dropped: list[Alert] = []

    # -- inputs -----------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in force."""
        return self._rules

    def observe_telemetry(self, t: DeviceTelemetry, *, site: str | None = None,
                          received_at: float | None = None) -> list[AlertEvent]:
        """Evaluate telemetry rules on one message, and note the device as seen.

        Args:
            t: the validated telemetry message.
            site: the device's site label, copied into the events.
            received_at: when the cloud received the message; absence rules then
                measure silence on the cloud's clock rather than the device's
                (recommended: a replayed or skewed ``ts`` then cannot make a live
                device look silent). Defaults to ``t.ts``.

        Returns:
            The transitions, in order: absence resolutions, then threshold
            openings and resolutions.
        """
        self._note(t.device_id, site, t.ts if received_at is None else max(t.ts, received_at))
        events = self._seen(t, t.ts if received_at is None else received_at)
        if t.historical:
            return events
        for rule in self._telemetry_rules:
            value = _value(t, rule.field)
            if value is not None:
                event = self._evaluate(rule, t.device_id, value, t.ts, None, None)
                if event is not None:
                    events.append(event)
        return events

    def observe_model_metrics(self, m: ModelMetrics, *,
                              site: str | None = None) -> list[AlertEvent]:
        """Evaluate model-metrics rules on one message.

        Args:
            m: the validated model metrics.
            site: the device's site label, copied into the events.

        Returns:
            The transitions (openings and resolutions).
        """
        self._note(m.device_id, site, m.ts)
        if m.historical:
            return []
        events: list[AlertEvent] = []
        for rule in self._model_rules:
            if not rule.applies_to(m.model):
                continue
            value = _value(m, rule.field)
            if value is not None:
                event = self._evaluate(rule, m.device_id, value, m.ts, m.model, m.version)
                if event is not None:
                    events.append(event)
        return events

    def tick(self, now: float) -> list[AlertEvent]:
        """Evaluate absence rules at ``now`` (Unix time, s).

        A device is silent when ``now - last_seen`` exceeds the rule's limit
        (``intervals`` x the device's last declared ``interval_s``, at least
        ``min_silence_s``); devices never seen are never silent.
        """
        self._advance(now)
        events: list[AlertEvent] = []
        for device_id, device in self._devices.items():
            if device.stopped:
                continue
            for rule in self._absence_rules:
                key = (device_id, rule.name)
                silence = device.silence(now)
                limit = rule.limit_s(device.interval_s)
                if key in self._open or silence <= limit:
                    continue
                message = rule.render(device_id=device_id, silence_s=silence,
                                      interval_s=device.interval_s)
                alert = Alert(device_id=device_id, rule=rule.name, severity=rule.severity,
                              metric=rule.metric, value=silence, threshold=limit,
                              message=_clip(message), opened_at=now, ts=now)
                events.append(self._opened(alert, now))
        return events

    def device_stopped(self, device_id: str, at: float) -> list[AlertEvent]:
        """A device stopped cleanly (its ``offline`` state says ``shutdown``).

        A stopped device is not silent: absence rules ignore it (and resolve
        what they had opened) until it reports again. An ungraceful death (the
        broker's will) changes nothing here: silence beyond the rule's limit
        still opens the alert.
        """
        self._advance(at)
        device = self._devices.get(device_id)
        if device is None:
            return []
        device.stopped = True
        return [self._resolved((device_id, rule.name), at) for rule in self._absence_rules
                if (device_id, rule.name) in self._open]

    def resume(self, now: float) -> None:
        """Measure silence from ``now`` at the earliest, for every known device.

        Call it when the cloud was not listening until ``now`` (after
        :meth:`restore`, or after its broker connection came back), so that
        its own outage does not open an absence alert for every device; a
        device that stays silent is still reported, one limit after ``now``.
        """
        for device in self._devices.values():
            device.watch_from = now if device.watch_from is None else max(device.watch_from, now)

    def acknowledge(self, device_id: str, rule: str, by: str, *,
                    at: float | None = None) -> AlertEvent | None:
        """Mark an open alert acknowledged (it stays active until it resolves).

        Args:
            device_id: the device.
            rule: the rule name.
            by: who acknowledged (an id: ``[A-Za-z0-9_-]{1,64}``).
            at: when (Unix time, s); defaults to the newest time the engine has
                seen (message timestamps and ticks).

        Returns:
            The ``acknowledged`` transition, or ``None`` when no such alert is
            open or it is already acknowledged.

        Raises:
            AcknowledgeError: ``by`` or ``at`` is not acceptable.
        """
        alert = self._open.get((device_id, rule))
        if alert is None or alert.state == "acknowledged":
            return None
        when = at if at is not None else max(self._clock or alert.ts, alert.ts)
        try:
            acked = Alert.model_validate(
                alert.model_dump() | {"state": "acknowledged", "acknowledged_by": by, "ts": when}
            )
        except ValidationError as exc:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            raise AcknowledgeError(device_id, rule, detail) from None
        self._advance(when)
        self._open[(device_id, rule)] = acked
        logger.info("alert %s/%s acknowledged by %s", device_id, rule, by)
        return AlertEvent(acked, "acknowledged", when, self._sites.get(device_id))

    # -- queries ----------------------------------------------------------------

    def active(self) -> list[Alert]:
        """Open (firing or acknowledged) alerts, by device then rule."""
        return [self._open[k] for k in sorted(self._open)]

    @property
    def dropped_on_restore(self) -> list[Alert]:
        """Restored alerts whose rule no longer exists or now watches another metric.

        The caller clears their retained topics (and may store them as resolved).
        """
        return list(self._dropped)

    def forget_device(self, device_id: str) -> list[Alert]:
        """Drop everything known about a device (decommissioned or deleted).

        Returns:
            The alerts that were open for it, so the caller can clear their topics.
        """
        dropped = [a for k, a in sorted(self._open.items()) if k[0] == device_id]
        self._open = {k: a for k, a in self._open.items() if k[0] != device_id}
        self._pending = {k: p for k, p in self._pending.items() if k[0] != device_id}
        self._devices.pop(device_id, None)
        self._sites.pop(device_id, None)
        return dropped

    # -- persistence --------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The engine's state as JSON-serializable data (for :meth:`restore`)."""
        state = _Snapshot(
            instance=self.instance,
            clock=self._clock,
            alerts=self.active(),
            pending=[
                _PendingState(device_id=d, rule=r, model=m or None, since=p.since, count=p.count)
                for (d, r, m), p in sorted(self._pending.items())
            ],
            devices=[
                _DeviceState(device_id=d, last_seen=s.last_seen, interval_s=s.interval_s,
                             watch_from=s.watch_from, stopped=s.stopped)
                for d, s in sorted(self._devices.items())
            ],
            sites=dict(sorted(self._sites.items())),
        )
        return state.model_dump(mode="json")

    @classmethod
    def restore(cls, rules: Sequence[Rule], snapshot: Mapping[str, object], *,
                instance: str) -> Self:
        """Rebuild an engine from :meth:`snapshot` output and the rules now in force.

        Open alerts and pending ``for`` timers of rules that no longer exist (or
        whose metric changed) are dropped; the dropped alerts are listed in
        :attr:`dropped_on_restore`. Call :meth:`resume` with the current time
        afterwards so that the restart does not count as device silence.

        Raises:
            SnapshotError: the snapshot is malformed or of an unknown format.
            RuleError: two rules share a name.
        """
        try:
            data = dict(snapshot)
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"not a mapping: {exc}") from None
        try:
            state = _Snapshot.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in errors[:5]
            )
            raise SnapshotError(detail) from None
        engine = cls(rules, instance=instance)
        if state.instance != instance:
            logger.warning("restoring alert state of instance %s into %s", state.instance,
                           instance)
        engine._clock = state.clock
        for alert in state.alerts:
            rule = engine._by_name.get(alert.rule)
            if rule is None or rule.metric != alert.metric:
                engine._dropped.append(alert)
                continue
            engine._open[(alert.device_id, alert.rule)] = alert
        for p in state.pending:
            rule = engine._by_name.get(p.rule)
            if isinstance(rule, ThresholdRule) and (p.model is None) == (
                    rule.source == "telemetry"):
                engine._pending[(p.device_id, p.rule, p.model or "")] = _Pending(p.since, p.count)
        for d in state.devices:
            engine._devices[d.device_id] = _Device(d.last_seen, d.interval_s, d.watch_from,
                                                   d.stopped)
        engine._sites = dict(state.sites)
        if engine._dropped:
            logger.info("dropped %d restored alerts of removed rules: %s", len(engine._dropped),
                        ", ".join(f"{a.device_id}/{a.rule}" for a in engine._dropped))
        return engine

    # -- internals ------------------------------------------------------------------

    def _advance(self, t: float) -> None:
        self._clock = t if self._clock is None else max(self._clock, t)

    def _note(self, device_id: str, site: str | None, t: float) -> None:
        self._advance(t)
        if site is not None:
            self._sites[device_id] = site

    def _seen(self, t: DeviceTelemetry, seen_at: float) -> list[AlertEvent]:
        """Record that telemetry arrived; resolve absence alerts when it is news."""
        device = self._devices.get(t.device_id)
        if device is None:
            self._devices[t.device_id] = _Device(seen_at, t.interval_s)
            return []
        if not t.historical:
            device.interval_s = t.interval_s
            device.stopped = False
        if seen_at <= device.last_seen:
            return []
        device.last_seen = seen_at
        return [
            self._resolved((t.device_id, rule.name), seen_at)
            for rule in self._absence_rules
            if (t.device_id, rule.name) in self._open
        ]

    def _evaluate(self, rule: ThresholdRule, device_id: str, value: float, ts: float,
                  model: str | None, version: str | None) -> AlertEvent | None:
        key = (device_id, rule.name)
        current = self._open.get(key)
        if current is not None and current.model == model:
            return self._resolved(key, ts) if rule.clears(value) else None
        pkey = (device_id, rule.name, model or "")
        if not rule.breaches(value):
            self._pending.pop(pkey, None)
            return None
        pending = self._pending.setdefault(pkey, _Pending(since=ts, count=0))
        pending.count += 1
        if current is not None or not self._due(rule, pending, ts):
            return None
        del self._pending[pkey]
        message = rule.render(device_id=device_id, value=value, model=model, version=version)
        alert = Alert(device_id=device_id, rule=rule.name, severity=rule.severity,
                      metric=rule.metric, value=value, threshold=rule.threshold, model=model,
                      version=version, message=_clip(message), opened_at=ts, ts=ts)
        return self._opened(alert, ts)

    @staticmethod
    def _due(rule: ThresholdRule, pending: _Pending, ts: float) -> bool:
        if rule.for_s is not None:
            return ts - pending.since >= rule.for_s
        if rule.for_samples is not None:
            return pending.count >= rule.for_samples
        return True

    def _opened(self, alert: Alert, at: float) -> AlertEvent:
        self._open[(alert.device_id, alert.rule)] = alert
        logger.info("alert %s/%s opened (%s): %s", alert.device_id, alert.rule,
                    alert.severity.value, alert.message)
        return AlertEvent(alert, "opened", at, self._sites.get(alert.device_id))

    def _resolved(self, key: _Key, at: float) -> AlertEvent:
        alert = self._open.pop(key)
        logger.info("alert %s/%s resolved", key[0], key[1])
        return AlertEvent(alert, "resolved", at, self._sites.get(key[0]))

