"""The device registry: who is in the fleet, online or not, with what.

Built from births and deaths on ``devices/{d}/state`` (bdSeq matched: a death
carrying an older bd_seq than the current birth is stale and ignored),
telemetry (last seen, sequence gaps) and deployment status (active model
versions). Persisted in the cloud's SQLite store so a restart keeps the fleet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from cloud.storage.sqlite_store import SqliteStore
from schemas.base import ModelFormat, RuntimeName
from schemas.device import DeploymentState, DeploymentStatus, DeviceState, DeviceTelemetry
from schemas.release import Requirements

logger = logging.getLogger(__name__)


@dataclass
class DeviceRecord:
    """What the cloud knows about one device."""

    device_id: str
    online: bool = False
    bd_seq: int = -1
    first_seen: float | None = None
    last_seen: float | None = None
    state_changed_at: float | None = None
    offline_reason: str | None = None
    agent_version: str | None = None
    site: str | None = None
    platform: str | None = None
    machine: str | None = None
    cpu_count: int | None = None
    memory_total_mb: float | None = None
    memory_available_mb: float | None = None
    gpu: bool = False
    runtimes: dict[str, str] = field(default_factory=dict)
    model_formats: list[str] = field(default_factory=list)
    fl_tasks: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    last_seq: int = -1
    seq_gaps: int = 0
    telemetry_interval_s: float | None = None
    last_telemetry: dict[str, float | None] = field(default_factory=dict)


SELECTION_FIELDS = ("cpu_percent", "temperature_c", "battery_percent", "battery_plugged",
                    "network_latency_ms")
"""Latest telemetry values kept per device for client selection (no SQL per device)."""


StateVerdict = Literal["applied", "stale_birth", "birth_out_of_time", "stale_death"]


SEEN_WINDOW = 1024
SEEN_MASK = (1 << SEEN_WINDOW) - 1


@dataclass(frozen=True, slots=True)
class TelemetryCheck:
    """What one telemetry message told the registry."""

    gap: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """A birth or death to apply to the ``device_sessions`` table."""

    device_id: str
    bd_seq: int
    ts: float
    online: bool


@dataclass
class RegistryChanges:
    """Records and session events to persist together with an ingest batch."""

    records: list[tuple[str, str]] = field(default_factory=list)
    sessions: list[SessionEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records or self.sessions)


class DeviceRegistry:
    """In memory; changes are persisted by the ingest writer in its batch transaction.

    The in-memory state is only ever changed on the event loop; what a batch
    persists (:meth:`take_changes`) is taken at the same moment as the batch's
    messages, so the stored registry never runs ahead of the stored telemetry.
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._dirty: set[str] = set()
        self._sessions: list[SessionEvent] = []
        self._seen: dict[str, int] = {}
        """Per device, a bitmap of the last SEEN_WINDOW sequence numbers (bit i: last_seq-i)."""
        known = {f.name for f in fields(DeviceRecord)}
        for row in store.query("SELECT device_id, record FROM devices"):
            try:
                data = json.loads(row["record"])
                record = DeviceRecord(**{k: v for k, v in data.items() if k in known})
            except (TypeError, ValueError) as exc:  # a record no longer readable: skip it
                logger.warning("device record of %s is unreadable and is ignored: %s",
                               row["device_id"], exc)

                continue
            self._devices[record.device_id] = record

    def _record(self, device_id: str) -> DeviceRecord:
        record = self._devices.get(device_id)
        if record is None:
            record = DeviceRecord(device_id)
            self._devices[device_id] = record
        return record

    def on_state(self, state: DeviceState, *, retained: bool = False,
                 max_skew_s: float = 300.0) -> StateVerdict:
        """Apply a birth or death; says what became of it.

        A birth is refused (``stale_birth``) when its connection is older than
        the one the registry knows, or is the one that already died (a replay);
        a live birth also needs a timestamp within ``max_skew_s`` of now
        (``birth_out_of_time``). A retained birth, delivered when the cloud
        subscribes, may be old: only its bd_seq is checked.
        """
        with self._lock:
            record = self._record(state.device_id)
            if state.state == "online":
                died = state.bd_seq == record.bd_seq and not record.online \
                    and record.offline_reason is not None
                if state.bd_seq < record.bd_seq or died:
                    self.counters["stale_birth"] += 1
                    return "stale_birth"
                if not retained and abs(state.ts - time.time()) > max_skew_s:
                    self.counters["birth_out_of_time"] += 1
                    return "birth_out_of_time"
                record.online = True
                record.bd_seq = state.bd_seq
                record.state_changed_at = state.ts
                record.offline_reason = None
                record.first_seen = record.first_seen or state.ts
                record.last_seen = max(record.last_seen or 0.0, state.ts)
                record.agent_version = state.agent_version
                record.site = state.site
                record.memory_available_mb = state.memory_available_mb
                record.runtimes = {k.value: v for k, v in state.runtimes.items()}
                record.model_formats = [f.value for f in state.model_formats]
                record.fl_tasks = sorted(state.fl_tasks)
                if state.hardware is not None:
                    hw = state.hardware
                    record.platform, record.machine = hw.platform, hw.machine
                    record.cpu_count, record.memory_total_mb = hw.cpu_count, hw.memory_total_mb
                    record.gpu = hw.gpu
            else:
                if state.bd_seq != record.bd_seq or not record.online:
                    # A death from an earlier connection (or a repeat): the device is
                    # already back with a newer birth, or already offline.
                    self.counters["stale_death"] += 1
                    logger.info("%s: ignored stale death (bd_seq %d, current %d)",
                                state.device_id, state.bd_seq, record.bd_seq)
                    return "stale_death"
                record.online = False
                record.state_changed_at = state.ts
                record.offline_reason = state.reason or "lwt"
            self._sessions.append(SessionEvent(state.device_id, state.bd_seq, state.ts,
                                               state.state == "online"))
            self._dirty.add(record.device_id)
            return "applied"

    def on_telemetry(self, telemetry: DeviceTelemetry) -> TelemetryCheck:
        """Note a telemetry message: last seen, and sequence gaps within a session."""
        with self._lock:
            record = self._record(telemetry.device_id)
            gap = 0
            duplicate = False
            seq = telemetry.seq
            seen = self._seen.get(record.device_id, 0)
            if record.session_id == telemetry.session_id:
                if seq <= record.last_seq:
                    # Seen before only if it is in the window of recent sequence numbers;
                    # an older one, or one that arrives out of order, goes on to storage,
                    # whose keys store it once.
                    back = record.last_seq - seq
                    duplicate = back < SEEN_WINDOW and bool(seen >> back & 1)
                    if not duplicate and back < SEEN_WINDOW:
                        seen |= 1 << back
                else:
                    if seq > record.last_seq + 1:
                        gap = seq - record.last_seq - 1
                        record.seq_gaps += gap
                        self.counters["seq_gap"] += gap
                    seen = ((seen << (seq - record.last_seq)) | 1) & SEEN_MASK
                    record.last_seq = seq
            else:  # a new agent session starts its own sequence
                record.session_id = telemetry.session_id
                record.last_seq = seq
                seen = 1
            self._seen[record.device_id] = seen
            if not duplicate and telemetry.ts >= (record.last_seen or 0.0):
                record.last_telemetry = {
                    name: (None if (value := getattr(telemetry, name)) is None
                           else float(value)) for name in SELECTION_FIELDS}
            record.last_seen = max(record.last_seen or 0.0, telemetry.ts)
            record.first_seen = record.first_seen or telemetry.ts
            record.telemetry_interval_s = telemetry.interval_s
            self._dirty.add(record.device_id)
            return TelemetryCheck(gap, duplicate)

    def on_deployment(self, status: DeploymentStatus) -> None:
        """Track active model versions."""
        with self._lock:
            record = self._record(status.device_id)
            if status.state in (DeploymentState.INSTALLED, DeploymentState.ROLLED_BACK) \
                    and status.active_version:
                record.models[status.model] = status.active_version
                self._dirty.add(record.device_id)

    # -- persistence (taken on the event loop, written by the ingest writer) ----------

    def take_changes(self) -> RegistryChanges:
        """Serialized changed records and session events since the previous call."""
        with self._lock:
            records = [(d, json.dumps(asdict(self._devices[d]))) for d in sorted(self._dirty)]
            sessions, self._sessions = self._sessions, []
            self._dirty.clear()
        return RegistryChanges(records, sessions)

    def restore_changes(self, changes: RegistryChanges) -> None:
        """Put back changes whose batch failed to commit (retried with the next one)."""
        with self._lock:
            self._dirty.update(d for d, _ in changes.records)
            self._sessions = changes.sessions + self._sessions

    def pending_changes(self) -> bool:
        """Whether anything waits to be persisted."""
        return bool(self._dirty or self._sessions)

    def write_changes(self, changes: RegistryChanges) -> None:
        """Persist ``changes`` (inside the caller's transaction, on the writer thread)."""
        with self.store.transaction() as db:
            for event in changes.sessions:
                if event.online:
                    # A new birth ends whatever session was still open (a death that
                    # never came, a broker that lost the will): no overlapping sessions.
                    db.execute("UPDATE device_sessions SET offline_at=? WHERE device_id=? "
                               "AND offline_at IS NULL AND online_at <= ? AND bd_seq != ?",
                               (event.ts, event.device_id, event.ts, event.bd_seq))
                    db.execute("INSERT OR IGNORE INTO device_sessions(device_id, bd_seq, "
                               "online_at) VALUES (?,?,?)",
                               (event.device_id, event.bd_seq, event.ts))
                else:
                    db.execute("UPDATE device_sessions SET offline_at=? WHERE device_id=? "
                               "AND bd_seq=? AND offline_at IS NULL",
                               (event.ts, event.device_id, event.bd_seq))
            db.executemany("INSERT INTO devices(device_id, record) VALUES (?, ?) "
                           "ON CONFLICT(device_id) DO UPDATE SET record=excluded.record",
                           changes.records)

    # -- queries ----------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord | None:
        """One device."""
        return self._devices.get(device_id)

    def devices(self, *, online: bool | None = None) -> list[DeviceRecord]:
        """Every device, sorted by id (optionally only online or offline ones)."""
        devices = sorted(self._devices.values(), key=lambda r: r.device_id)
        return [d for d in devices if online is None or d.online == online]

    def compatible(self, requirements: Requirements, *, online_only: bool = True,
                   ) -> list[DeviceRecord]:
        """Devices that can run a model with these requirements (the seed's query)."""
        return [d for d in self.devices(online=True if online_only else None)
                if not compatibility_problems(d, requirements)]


def compatibility_problems(device: DeviceRecord, reqs: Requirements) -> list[str]:
    """Why ``device`` cannot run a model with ``reqs`` (empty when it can)."""
    problems = []
    known_formats = {f.value for f in ModelFormat}
    known_runtimes = {r.value for r in RuntimeName}
    formats = {ModelFormat(f) for f in device.model_formats if f in known_formats}
    runtimes = {RuntimeName(r) for r in device.runtimes if r in known_runtimes}
    if reqs.formats and not set(reqs.formats) & formats:
        problems.append("no supported format")
    if reqs.runtimes and not set(reqs.runtimes) & runtimes:
        problems.append("no required runtime")
    if reqs.min_memory_mb and (device.memory_available_mb or 0.0) < reqs.min_memory_mb:
        problems.append("not enough memory")
    if reqs.gpu and not device.gpu:
        problems.append("no GPU")
    return problems
