"""The embedded store: SQLite (WAL), the cloud's own database.

It holds telemetry, model metrics, deployment status, alerts, the device
registry and the alert engine's state.

Telemetry and model metrics are keyed on (device_id, session_id, seq), so a QoS 1
redelivery or an offline-buffer replay is stored once (``INSERT OR IGNORE``).
Indexes serve per-device time-range queries. Writes come in batches, one
transaction each.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud.storage.sink import AlertEvent, RolloutEvent, SinkStats
from schemas.alerts import CloudHealth
from schemas.device import DeploymentStatus, DeviceTelemetry, ModelMetrics
from schemas.fl import TaskStatus

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL,
    ts REAL NOT NULL, cpu_percent REAL, memory_percent REAL, disk_percent REAL,
    temperature_c REAL, battery_percent REAL, battery_plugged INTEGER,
    network_latency_ms REAL, prediction_count INTEGER, error_count INTEGER,
    error_rate_percent REAL, uptime_s REAL, interval_s REAL, historical INTEGER,
    site TEXT,
    PRIMARY KEY (device_id, session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry(device_id, ts);
CREATE TABLE IF NOT EXISTS model_metrics (
    device_id TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, runtime TEXT NOT NULL, ts REAL NOT NULL,
    window_s REAL, sample_count INTEGER, latency_ms_mean REAL, latency_ms_p50 REAL,
    latency_ms_p95 REAL, latency_ms_p99 REAL, throughput_per_s REAL, memory_mb REAL,
    cpu_percent REAL, error_count INTEGER, error_rate_percent REAL, accuracy REAL,
    historical INTEGER, interval_count INTEGER, interval_errors INTEGER,
    PRIMARY KEY (device_id, session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS model_metrics_device_ts ON model_metrics(device_id, model, ts);
CREATE TABLE IF NOT EXISTS deployment_status (
    device_id TEXT NOT NULL, model TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL,
    target_version TEXT, active_version TEXT, previous_version TEXT, slot TEXT,
    error TEXT, reasons TEXT,
    PRIMARY KEY (device_id, model, ts, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL, rule TEXT NOT NULL, severity TEXT NOT NULL,
    metric TEXT, value REAL, threshold REAL, model TEXT, version TEXT, message TEXT,
    opened_at REAL NOT NULL, resolved INTEGER NOT NULL DEFAULT 0, resolved_at REAL,
    acknowledged_by TEXT, acknowledged_at REAL
);
CREATE INDEX IF NOT EXISTS alerts_device ON alerts(device_id, opened_at);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts(device_id, rule, opened_at);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_sessions (
    device_id TEXT NOT NULL, bd_seq INTEGER NOT NULL, online_at REAL NOT NULL,
    offline_at REAL,
    PRIMARY KEY (device_id, bd_seq, online_at)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fl_rounds (
    task TEXT NOT NULL, round INTEGER NOT NULL, ts REAL NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (task, round, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_events (
    rollout INTEGER NOT NULL, ts REAL NOT NULL, event TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, stage INTEGER NOT NULL, targets INTEGER NOT NULL,
    installed INTEGER NOT NULL, failed INTEGER NOT NULL, detail TEXT,
    PRIMARY KEY (rollout, ts, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cloud_health (
    instance TEXT NOT NULL, ts REAL NOT NULL, health TEXT NOT NULL,
    PRIMARY KEY (instance, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_acks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, rule TEXT NOT NULL,
    by TEXT NOT NULL, requested_at REAL NOT NULL
);
"""

HEALTH_KEPT_S = 7 * 86_400
OWNER_ONLY = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")
"""SQLite's files next to the database (created with the database file's mode)."""

_ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "model_metrics": [("interval_count", "INTEGER"), ("interval_errors", "INTEGER")],
}

_TELEMETRY_COLUMNS = (
    "device_id", "session_id", "seq", "ts", "cpu_percent", "memory_percent", "disk_percent",
    "temperature_c", "battery_percent", "battery_plugged", "network_latency_ms",
    "prediction_count", "error_count", "error_rate_percent", "uptime_s", "interval_s",
    "historical", "site",
)
_METRICS_COLUMNS = (
    "device_id", "session_id", "seq", "model", "version", "runtime", "ts", "window_s",
    "sample_count", "latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
    "throughput_per_s", "memory_mb", "cpu_percent", "error_count", "error_rate_percent",
    "accuracy", "historical", "interval_count", "interval_errors",
)


def _owner_only(path: Path) -> None:
    """Tighten an existing database (and its WAL, shared-memory and journal files) to 0600.

    SQLite creates its side files with the database file's mode, so a store made
    readable by others before (0644) is tightened before it is opened.
    """
    for file in (path, *(path.with_name(path.name + suffix) for suffix in SIDE_FILES)):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & ~OWNER_ONLY:
            file.chmod(mode & OWNER_ONLY)
            logger.info("%s was mode %o: tightened to owner-only", file, mode)


def _insert(table: str, columns: Sequence[str]) -> str:
    marks = ",".join("?" * len(columns))
    return f"INSERT OR IGNORE INTO {table}({','.join(columns)}) VALUES ({marks})"  # noqa: S608


class SqliteStore:
    """The cloud's SQLite database (a TelemetrySink, and more)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        # The store holds the fleet's data and the coordinators' state: owner-only.
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, OWNER_ONLY))
        _owner_only(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._written = 0
        self._duplicates = 0

    def _add_missing_columns(self) -> None:
        """Columns added after a store was created (an older store keeps its rows)."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (serialised across threads).

        Nested calls (from the same thread) are savepoints: an inner failure
        rolls back only the inner part, and nothing is durable before the
        outermost transaction commits.
        """
        with self._lock:
            depth = self._depth
            if depth:
                name = f"sp{depth}"
                self._db.execute(f"SAVEPOINT {name}")
            else:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth = depth + 1
            try:
                yield self._db
            except BaseException:
                self._depth = depth
                if depth:
                    self._db.execute(f"ROLLBACK TO {name}")
                    self._db.execute(f"RELEASE {name}")
                else:
                    self._db.execute("ROLLBACK")
                raise
            self._depth = depth
            self._db.execute(f"RELEASE {name}" if depth else "COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Read rows."""
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # -- TelemetrySink ---------------------------------------------------------

    def write_telemetry(self, batch: Sequence[DeviceTelemetry], *,
                        sites: dict[str, str] | None = None) -> None:
        """Store telemetry; duplicates (same device, session, seq) are ignored."""
        sites = sites or {}
        rows = [(t.device_id, t.session_id, t.seq, t.ts, t.cpu_percent, t.memory_percent,
                 t.disk_percent, t.temperature_c, t.battery_percent,
                 None if t.battery_plugged is None else int(t.battery_plugged),
                 t.network_latency_ms, t.prediction_count, t.error_count,
                 t.error_rate_percent, t.uptime_s, t.interval_s, int(t.historical),
                 sites.get(t.device_id)) for t in batch]
        self._write_many("telemetry", _TELEMETRY_COLUMNS, rows)

    def write_model_metrics(self, batch: Sequence[ModelMetrics], *,
                            sites: dict[str, str] | None = None) -> None:
        """Store model metrics; duplicates are ignored."""
        rows = [(m.device_id, m.session_id, m.seq, m.model, m.version, m.runtime.value, m.ts,
                 m.window_s, m.sample_count, m.latency_ms_mean, m.latency_ms_p50,
                 m.latency_ms_p95, m.latency_ms_p99, m.throughput_per_s, m.memory_mb,
                 m.cpu_percent, m.error_count, m.error_rate_percent, m.accuracy,
                 int(m.historical), m.interval_count, m.interval_errors) for m in batch]
        self._write_many("model_metrics", _METRICS_COLUMNS, rows)

    def _write_many(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]],
                    ) -> None:
        if not rows:
            return
        with self.transaction() as db:
            before = db.total_changes
            db.executemany(_insert(table, columns), rows)
            stored = db.total_changes - before
        self._written += stored
        self._duplicates += len(rows) - stored

    def write_deployment_status(self, batch: Sequence[DeploymentStatus]) -> None:
        """Store deployment status changes."""
        rows = [(s.device_id, s.model, s.ts, s.state.value, s.target_version, s.active_version,
                 s.previous_version, s.slot, s.error, json.dumps(s.reasons)) for s in batch]
        self._write_many("deployment_status", (
            "device_id", "model", "ts", "state", "target_version", "active_version",
            "previous_version", "slot", "error", "reasons"), rows)

    def write_alert_events(self, batch: Sequence[AlertEvent]) -> None:
        """Store alert transitions (the seed's alerts table with resolved/resolved_at)."""
        with self.transaction() as db:
            for event in batch:
                a = event.alert
                if event.transition == "opened":
                    db.execute(
                        "INSERT OR IGNORE INTO alerts(device_id, rule, severity, metric, value, "
                        "threshold, model, version, message, opened_at) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (a.device_id, a.rule, a.severity.value, a.metric, a.value, a.threshold,
                         a.model, a.version, a.message, a.opened_at))
                elif event.transition == "acknowledged":
                    db.execute(
                        "UPDATE alerts SET acknowledged_by=?, acknowledged_at=? "
                        "WHERE device_id=? AND rule=? AND opened_at=?",
                        (a.acknowledged_by, event.at, a.device_id, a.rule, a.opened_at))
                else:
                    db.execute(
                        "UPDATE alerts SET resolved=1, resolved_at=? "
                        "WHERE device_id=? AND rule=? AND opened_at=? AND resolved=0",
                        (event.at, a.device_id, a.rule, a.opened_at))
        self._written += len(batch)

    def write_fl_round(self, status: TaskStatus) -> None:
        """Store one federated round's record."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO fl_rounds(task, round, ts, status) "
                       "VALUES (?,?,?,?)", (status.task, status.round, status.ts,
                                            status.model_dump_json()))

    def write_rollout_event(self, event: RolloutEvent) -> None:
        """Keep one step of a model rollout (``edgefl model status`` shows them)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO rollout_events(rollout, ts, event, model, "
                       "version, stage, targets, installed, failed, detail) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (event.rollout, event.at, event.event, event.model, event.version,
                        event.stage, event.targets, event.installed, event.failed,
                        event.detail))

    def rollout_events(self, rollout: int) -> list[dict[str, Any]]:
        """The steps of one rollout, oldest first."""
        return [dict(r) for r in self.query(
            "SELECT ts, event, stage, targets, installed, failed, detail FROM rollout_events "
            "WHERE rollout=? ORDER BY ts", (rollout,))]

    def write_cloud_health(self, health: CloudHealth) -> None:
        """Keep the service's counters as a time series (a week of it)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO cloud_health(instance, ts, health) VALUES (?,?,?)",
                       (health.instance, health.ts, health.model_dump_json()))
            db.execute("DELETE FROM cloud_health WHERE instance=? AND ts < ?",
                       (health.instance, health.ts - HEALTH_KEPT_S))

    def flush(self) -> None:
        """Nothing is buffered: every write commits."""

    def stats(self) -> SinkStats:
        """Rows written and duplicates ignored."""
        return SinkStats(written=self._written, errors={"duplicates": self._duplicates})

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # -- key/value (alert engine state, coordinator state) ------------------------

    def put(self, key: str, value: object) -> None:
        """Store a JSON value."""
        with self.transaction() as db:
            db.execute("INSERT INTO kv(key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, json.dumps(value)))

    def get(self, key: str) -> Any:
        """A stored JSON value, or None."""
        rows = self.query("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else None
