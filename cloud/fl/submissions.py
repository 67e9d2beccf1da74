"""Federated tasks handed to the running cloud service (``edgefl fl start``).

The command line never runs a second service: it checks the task, then writes a
request into the service's store; the service picks it up, starts a
coordinator, and records the task so that a restart starts it again. Requests
and their outcome are rows, so the command can follow what happened.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

from cloud.fl.config import FLTaskConfig
from cloud.storage.sqlite_store import SqliteStore
from schemas.base import now

logger = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fl_task_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, config TEXT NOT NULL,
        requested_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending', detail TEXT,
        handled_at REAL)""",
    """CREATE TABLE IF NOT EXISTS fl_tasks (
        name TEXT PRIMARY KEY, config TEXT NOT NULL, submitted_at REAL NOT NULL)""",
)
RequestState = Literal["pending", "started", "refused", "withdrawn"]


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """One request of ``edgefl fl start``."""

    id: int
    name: str
    config: FLTaskConfig
    state: RequestState
    detail: str | None


class Submissions:
    """The request queue and the submitted tasks (every method runs off the loop)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def request(self, name: str, config: FLTaskConfig) -> int:
        """Queue a task for the service; returns the request id."""
        with self.store.transaction() as db:
            cursor = db.execute(
                "INSERT INTO fl_task_requests(name, config, requested_at) VALUES (?,?,?)",
                (name, config.model_dump_json(), now()))
        return int(cursor.lastrowid or 0)

    def get(self, request_id: int) -> TaskRequest | None:
        """A request and its outcome."""
        rows = self.store.query("SELECT * FROM fl_task_requests WHERE id=?", (request_id,))
        return _request(rows[0]) if rows else None

    def withdraw(self, request_id: int) -> bool:
        """Withdraw a request nobody picked up; returns whether it was still pending."""
        with self.store.transaction() as db:
            cursor = db.execute("UPDATE fl_task_requests SET state='withdrawn', handled_at=? "
                                "WHERE id=? AND state='pending'", (now(), request_id))
        return cursor.rowcount == 1

    def pending(self) -> list[TaskRequest]:
        """Requests waiting for the service, oldest first (unreadable ones are refused)."""
        out = []
        for row in self.store.query(
                "SELECT * FROM fl_task_requests WHERE state='pending' ORDER BY id"):
            try:
                out.append(_request(row))
            except ValueError as exc:
                self.answer(int(row["id"]), "refused", f"unreadable request: {exc}")
        return out

    def answer(self, request_id: int, state: RequestState, detail: str | None = None) -> None:
        """Record what became of a request; a started task is recorded as submitted."""
        with self.store.transaction() as db:
            db.execute("UPDATE fl_task_requests SET state=?, detail=?, handled_at=? WHERE id=?",
                       (state, detail, now(), request_id))
            if state == "started":
                row = db.execute("SELECT name, config FROM fl_task_requests WHERE id=?",
                                 (request_id,)).fetchone()
                db.execute("INSERT INTO fl_tasks(name, config, submitted_at) VALUES (?,?,?) "
                           "ON CONFLICT(name) DO UPDATE SET config=excluded.config, "
                           "submitted_at=excluded.submitted_at",
                           (row["name"], row["config"], now()))

    def submitted(self) -> dict[str, FLTaskConfig]:
        """Tasks submitted earlier (started again after a restart)."""
        out = {}
        for row in self.store.query("SELECT name, config FROM fl_tasks ORDER BY name"):
            try:
                out[row["name"]] = FLTaskConfig.model_validate_json(row["config"])
            except ValueError as exc:
                logger.warning("submitted task %s is unreadable and is not started: %s",
                               row["name"], exc)
        return out


def _request(row: object) -> TaskRequest:
    data = dict(row)  # type: ignore[call-overload]
    return TaskRequest(int(data["id"]), str(data["name"]),
                       FLTaskConfig.model_validate(json.loads(data["config"])),
                       data["state"], data["detail"])
