"""Store and forward: a bounded on-disk queue for messages produced while offline.

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

    Args:
        path: SQLite file.
        max_messages: most messages kept.
        max_bytes: most payload bytes kept.
    """

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._count = self._bytes = 0
        self._evicted = 0
        if path.exists():
            db = self._open()
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
            self._count, self._bytes = int(row[0]), int(row[1])
            evicted = db.execute("SELECT value FROM counters WHERE name='evicted'").fetchone()
            self._evicted = int(evicted[0]) if evicted else 0
            self._close_if_empty()

    def _open(self) -> sqlite3.Connection:
        """The database, opened on demand: an agent that stays online keeps no file open."""
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _close_if_empty(self) -> None:
        if self._count == 0 and self._db is not None:
            self._db.close()
            self._db = None

    def __len__(self) -> int:
        return self._count

    @property
    def evicted(self) -> int:
        """Messages dropped (oldest first) because the queue was full, since creation."""
        return self._evicted

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message durably; returns how many old messages were evicted for it."""
        if len(payload) > self.max_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds the buffer cap")
        with self._lock:
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO outbox(topic, payload, qos, retain) VALUES (?,?,?,?)",
                           (topic, payload, qos, int(retain)))
                self._count += 1
                self._bytes += len(payload)
                evicted = 0
                while self._count > self.max_messages or self._bytes > self.max_bytes:
                    oldest = db.execute(
                        "SELECT id, LENGTH(payload) FROM outbox ORDER BY id LIMIT 1").fetchone()
                    db.execute("DELETE FROM outbox WHERE id=?", (oldest[0],))
                    self._count -= 1
                    self._bytes -= int(oldest[1])
                    evicted += 1
                if evicted:
                    db.execute(
                        "INSERT INTO counters(name, value) VALUES ('evicted', ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (evicted,))
                db.execute("COMMIT")
            except sqlite3.Error:
                db.execute("ROLLBACK")
                raise
            self._evicted += evicted
        if evicted:
            logger.warning("offline buffer full: evicted %d oldest message(s)", evicted)
        return evicted

    def peek(self, limit: int = 100) -> list[BufferedMessage]:
        """The oldest ``limit`` messages, oldest first."""
        with self._lock:
            if self._count == 0:
                return []
            rows = self._open().execute(
                "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?",
                (limit,)).fetchall()
        return [BufferedMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]))
                for r in rows]

    def remove(self, ids: list[int]) -> None:
        """Delete messages once the broker acknowledged them."""
        if not ids:
            return
        with self._lock:
            if self._count == 0:
                return
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            removed = 0
            freed = 0
            for message_id in ids:
                row = db.execute("SELECT LENGTH(payload) FROM outbox WHERE id=?",
                                 (message_id,)).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM outbox WHERE id=?", (message_id,))
                removed += 1
                freed += int(row[0])
            db.execute("COMMIT")
            self._count -= removed
            self._bytes -= freed
            self._close_if_empty()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
