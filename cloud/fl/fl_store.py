"""Where a federated task's state lives in the cloud's SQLite store.

Incremental by design: accepting an update appends one row, a refusal bumps
one counter (and keeps the last few examples), an evaluation appends one row;
the small state-machine record is rewritten only at transitions, and a
released round is one row of ``fl_rounds``. Nothing here grows with the
number of messages a device sends. Every method runs on a worker thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from cloud.storage.sqlite_store import SqliteStore
from schemas.base import now
from schemas.fl import MAX_REJECTION_EXAMPLES, Rejection, TaskStatus

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fl_updates (
    task TEXT NOT NULL, round INTEGER NOT NULL, device_id TEXT NOT NULL,
    attempt INTEGER NOT NULL, meta TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (task, round, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fl_evals (
    task TEXT NOT NULL, round INTEGER NOT NULL, device_id TEXT NOT NULL,
    meta TEXT NOT NULL, PRIMARY KEY (task, round, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fl_rejections (
    task TEXT NOT NULL, round INTEGER NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (task, round, reason)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fl_rejection_examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, round INTEGER NOT NULL,
    device_id TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT, ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fl_rejection_examples_task ON fl_rejection_examples(task, round);
"""


@dataclass(frozen=True, slots=True)
class Rejections:
    """Refusals of one round: counts by reason and the last examples."""

    counts: dict[str, int]
    examples: list[Rejection]


class FLStore:
    """One task's rows in the cloud store."""

    def __init__(self, store: SqliteStore, task: str) -> None:
        self.store = store
        self.task = task
        self.key = f"fl:{task}"
        with store.transaction() as db:  # (executescript would commit mid-transaction)
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(statement)

    # -- the state machine's record ----------------------------------------------------

    def load_state(self) -> Any:
        """The saved state record (JSON), or None."""
        return self.store.get(self.key)

    def save_state(self, state: dict[str, Any]) -> None:
        """Rewrite the small state record (at transitions only)."""
        self.store.put(self.key, state)

    def move_aside(self, reason: str) -> str:
        """Keep an unreadable state record under another key; returns that key."""
        aside = f"{self.key}:unreadable:{int(now())}"
        with self.store.transaction() as db:
            db.execute("UPDATE kv SET key=? WHERE key=?", (aside, self.key))
        logger.error("%s: saved state moved to %s: %s", self.task, aside, reason)
        return aside

    # -- per message ---------------------------------------------------------------------

    def add_update(self, round_: int, device_id: str, attempt: int, meta: dict[str, Any],
                   ) -> None:
        """Record one accepted update."""
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO fl_updates(task, round, device_id, attempt, meta, "
                       "received_at) VALUES (?,?,?,?,?,?)",
                       (self.task, round_, device_id, attempt, json.dumps(meta), now()))

    def updates(self, round_: int) -> dict[str, dict[str, Any]]:
        """Accepted updates of a round, by device."""
        rows = self.store.query("SELECT device_id, meta FROM fl_updates WHERE task=? AND round=?",
                                (self.task, round_))
        return {r["device_id"]: json.loads(r["meta"]) for r in rows}

    def add_eval(self, round_: int, device_id: str, meta: dict[str, float]) -> None:
        """Record one federated evaluation."""
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO fl_evals(task, round, device_id, meta) "
                       "VALUES (?,?,?,?)", (self.task, round_, device_id, json.dumps(meta)))

    def evals(self, round_: int) -> dict[str, dict[str, float]]:
        """Evaluations of a round, by device."""
        rows = self.store.query("SELECT device_id, meta FROM fl_evals WHERE task=? AND round=?",
                                (self.task, round_))
        return {r["device_id"]: json.loads(r["meta"]) for r in rows}

    def add_rejection(self, round_: int, rejection: Rejection) -> None:
        """Count one refusal and keep it as an example (only the last few are kept)."""
        with self.store.transaction() as db:
            db.execute("INSERT INTO fl_rejections(task, round, reason, count) VALUES (?,?,?,1) "
                       "ON CONFLICT(task, round, reason) DO UPDATE SET count = count + 1",
                       (self.task, round_, rejection.reason))
            cursor = db.execute(
                "INSERT INTO fl_rejection_examples(task, round, device_id, reason, detail, ts) "
                "VALUES (?,?,?,?,?,?)", (self.task, round_, rejection.device_id,
                                         rejection.reason, rejection.detail, now()))
            db.execute("DELETE FROM fl_rejection_examples WHERE task=? AND id <= ?",
                       (self.task, int(cursor.lastrowid or 0) - MAX_REJECTION_EXAMPLES))

    def rejections(self, round_: int) -> Rejections:
        """Refusals filed under a round."""
        counts = {r["reason"]: int(r["count"]) for r in self.store.query(
            "SELECT reason, count FROM fl_rejections WHERE task=? AND round=?",
            (self.task, round_))}
        examples = [Rejection(device_id=r["device_id"], reason=r["reason"], detail=r["detail"])
                    for r in self.store.query(
                        "SELECT device_id, reason, detail FROM fl_rejection_examples "
                        "WHERE task=? AND round=? ORDER BY id", (self.task, round_))]
        return Rejections(counts, examples)

    # -- rounds ---------------------------------------------------------------------------

    def release(self, state: dict[str, Any], status: TaskStatus) -> None:
        """A released round: its record and the new state, in one transaction."""
        with self.store.transaction():
            self.store.write_fl_round(status)
            self.save_state(state)

    def round_status(self, round_: int) -> TaskStatus | None:
        """The status recorded when ``round_`` was released (the latest, if released twice)."""
        rows = self.store.query("SELECT status FROM fl_rounds WHERE task=? AND round=? "
                                "ORDER BY ts DESC LIMIT 1", (self.task, round_))
        return TaskStatus.model_validate_json(rows[0]["status"]) if rows else None

    def history(self) -> list[TaskStatus]:
        """The released rounds, oldest first."""
        return [TaskStatus.model_validate_json(r["status"]) for r in self.store.query(
            "SELECT status FROM fl_rounds WHERE task=? ORDER BY round, ts", (self.task,))]
