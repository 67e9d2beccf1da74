"""Store and forward: a bounded on-disk outbox of everything not yet acknowledged.

Telemetry and model metrics are appended here before they are handed to the
MQTT client and deleted once the broker acknowledged them (PUBACK), so neither
a broker outage nor a crash of the agent loses them: after a restart the
outbox is sent again, and the cloud stores each message once (session + seq).
SQLite in WAL mode with ``synchronous=FULL``: once :meth:`OfflineBuffer.append`
returns, the message survives a power cut. When the queue is over its message
or byte cap, the oldest messages are evicted, and the evictions are counted
(persistently) so telemetry can report them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class BufferedMessage:
    """One queued message, in publish order by ``id``."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class OfflineBuffer:
    """Bounded FIFO on disk.

    Counters (messages, bytes, evictions) change only after a COMMIT
    succeeded, so a failed transaction (a full disk, an I/O error) leaves them
    equal to what is on disk; the error reaches the caller as ``sqlite3.Error``.

    Args:
        path: SQLite file.
        max_messages: most messages kept.
        max_bytes: most payload bytes kept.
        durable: ``synchronous=FULL`` (survives a power cut); otherwise NORMAL in
            WAL mode, which survives a crash of the process but not of the OS
            (the fleet simulator uses it).
    """

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int,
                 durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.durable = durable
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._count = self._bytes = 0
        self._evicted = 0
        self._last_id = 0
        self.first_id = 0
        """Id of the oldest message when the buffer was opened (0 when it was empty)."""

        if path.exists():
            db = self._open()
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(MIN(id), 0) "
                "FROM outbox").fetchone()
            self._count, self._bytes = int(row[0]), int(row[1])
            self.first_id = int(row[2])
            sequence = db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            self._last_id = int(sequence[0]) if sequence else 0
            evicted = db.execute("SELECT value FROM counters WHERE name='evicted'").fetchone()
            self._evicted = int(evicted[0]) if evicted else 0

    def _open(self) -> sqlite3.Connection:
        """The database, opened on first use and kept open."""
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def __len__(self) -> int:
        return self._count

    @property
    def evicted(self) -> int:
        """Messages dropped (oldest first) because the queue was full, since creation."""
        return self._evicted

    @property
    def last_id(self) -> int:
        """Id of the newest message appended (0 when none ever was)."""
        return self._last_id

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
               ) -> tuple[int, int]:
        """Queue a message durably; returns (its id, old messages evicted for it).

        Raises:
            ValueError: the message alone is larger than the byte cap.
            sqlite3.Error: the disk refused the write (nothing changed).
        """
        if len(payload) > self.max_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds the buffer cap")
        with self._lock:
            db = self._open()
            count, size = self._count + 1, self._bytes + len(payload)
            evicted = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                cursor = db.execute(
                    "INSERT INTO outbox(topic, payload, qos, retain) VALUES (?,?,?,?)",
                    (topic, payload, qos, int(retain)))
                message_id = int(cursor.lastrowid or 0)
                while count > self.max_messages or size > self.max_bytes:
                    oldest = db.execute(
                        "SELECT id, LENGTH(payload) FROM outbox ORDER BY id LIMIT 1").fetchone()
                    db.execute("DELETE FROM outbox WHERE id=?", (oldest[0],))
                    count -= 1
                    size -= int(oldest[1])
                    evicted += 1
                if evicted:
                    db.execute(
                        "INSERT INTO counters(name, value) VALUES ('evicted', ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (evicted,))
                db.execute("COMMIT")
            except sqlite3.Error:
                _rollback(db)
                raise
            self._count, self._bytes = count, size
            self._evicted += evicted
            self._last_id = message_id
        if evicted:
            logger.warning("offline buffer full: evicted %d oldest message(s)", evicted)
        return message_id, evicted

    def peek(self, limit: int = 100, *, after: int = 0) -> list[BufferedMessage]:
        """The oldest ``limit`` messages with an id above ``after``, oldest first."""
        with self._lock:
            if self._count == 0:
                return []
            rows = self._open().execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id "
                "LIMIT ?", (after, limit)).fetchall()
        return [BufferedMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]))
                for r in rows]

    def peek_urgent(self, *, after: int, limit: int = 100) -> list[BufferedMessage]:
        """Like :meth:`peek`, but without telemetry and model metrics.

        What is left (replies, deployment status, FL updates) goes ahead of a paced
        telemetry backlog.
        """
        with self._lock:
            if self._count == 0:
                return []
            rows = self._open().execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? "
                "AND topic NOT LIKE '%/telemetry' AND topic NOT LIKE '%/metrics' "
                "ORDER BY id LIMIT ?", (after, limit)).fetchall()
        return [BufferedMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]))
                for r in rows]

    def remove(self, ids: list[int]) -> None:
        """Delete messages once the broker acknowledged them (unknown ids are ignored).

        Raises:
            sqlite3.Error: the disk refused the change (nothing changed).
        """
        if not ids:
            return
        with self._lock:
            if self._count == 0:
                return
            db = self._open()
            removed = freed = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for message_id in ids:
                    row = db.execute("SELECT LENGTH(payload) FROM outbox WHERE id=?",
                                     (message_id,)).fetchone()
                    if row is None:
                        continue
                    db.execute("DELETE FROM outbox WHERE id=?", (message_id,))
                    removed += 1
                    freed += int(row[0])
                db.execute("COMMIT")
            except sqlite3.Error:
                _rollback(db)
                raise
            self._count -= removed
            self._bytes -= freed

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite may have ended it already)."""
    if db.in_transaction:
        db.execute("ROLLBACK")
