"""Where rollouts live in the cloud store: requests, rollouts, per-device states.

``edgefl model release|rollback|retire`` never publish anything themselves: they
write a request row; the rollout manager inside the running service answers it
and owns everything after. A rollout is one row (rewritten at transitions) plus
one row per device it concerns, so a SIGKILL at any moment resumes at the same
stage with the same deadline. Every method does disk work: call it off the loop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cloud.storage.sqlite_store import SqliteStore
from schemas.base import now

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS model_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL, body TEXT NOT NULL,
        requested_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending', detail TEXT,
        handled_at REAL)""",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL,
        state TEXT NOT NULL, record TEXT NOT NULL, created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts(model, id)",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout INTEGER NOT NULL, device_id TEXT NOT NULL, state TEXT NOT NULL,
        stage INTEGER, detail TEXT, updated_at REAL NOT NULL,
        PRIMARY KEY (rollout, device_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS model_publications (
        model TEXT PRIMARY KEY, version TEXT, chunk_count INTEGER NOT NULL DEFAULT 0,
        published_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS model_publication_variants (
        model TEXT NOT NULL, version TEXT NOT NULL, chunk_count INTEGER NOT NULL,
        PRIMARY KEY (model, version)) WITHOUT ROWID""",
)

Action = Literal["release", "rollback", "retire", "promote"]
RequestState = Literal["pending", "done", "refused", "withdrawn"]
RolloutState = Literal["running", "experiment", "aborting", "completed", "aborted"]
"""``experiment``: an A/B rollout serving both versions until ``edgefl model promote``."""
DeviceState = Literal["pending", "downloading", "installed", "active", "failed",
                      "rolled_back", "incompatible", "skipped"]
FINISHED: frozenset[str] = frozenset({"completed", "aborted"})


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One request of ``edgefl model``."""

    id: int
    action: Action
    body: dict[str, Any]
    state: RequestState
    detail: str | None


@dataclass(slots=True)
class Rollout:
    """One rollout's record (the state machine's own data)."""

    id: int
    model: str
    version: str
    state: RolloutState
    spec: dict[str, Any]
    previous_version: str | None
    order: list[str]
    """Every compatible device, in the order the stages take them."""
    canary: list[str]
    stage_sizes: list[int]
    """How many devices of ``order`` each stage targets (cumulative); the last stage may
    also be "everyone" (``everyone_at_last``)."""
    skipped: dict[str, str] = field(default_factory=dict)
    stage: int = 0
    stage_started_at: float = 0.0
    deadline: float = 0.0
    published_stage: int = -1
    """The stage whose manifest is on the broker (-1: none yet)."""
    chunks_published: bool = False
    reason: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    rollback_sent: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    """Other builds of the release that devices may take instead of ``version``."""
    prefer: dict[str, list[str]] = field(default_factory=dict)
    """Device class -> builds, fastest first (the manifest's ``prefer``)."""

    def builds(self) -> list[str]:
        """The release's version and its variants."""
        return [self.version, *self.variants]

    @property
    def last_stage(self) -> int:
        """Index of the final stage."""
        return len(self.stage_sizes) - 1

    def targets(self, stage: int | None = None) -> list[str]:
        """Devices targeted up to ``stage`` (default: the current one)."""
        size = self.stage_sizes[self.stage if stage is None else stage]
        return self.order[:size]

    def record(self) -> dict[str, Any]:
        """What is persisted (everything but the identity columns)."""
        out = asdict(self)
        for key in ("id", "model", "version", "state"):
            out.pop(key)
        return out


class RolloutStore:
    """Requests, rollouts and device states in the cloud store."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    # -- requests (the command line writes, the manager answers) ------------------------

    def request(self, action: Action, body: dict[str, Any]) -> int:
        """Queue a request for the service; returns its id."""
        with self.store.transaction() as db:
            cursor = db.execute("INSERT INTO model_requests(action, body, requested_at) "
                                "VALUES (?,?,?)", (action, json.dumps(body), now()))
        return int(cursor.lastrowid or 0)

    def pending(self) -> list[ModelRequest]:
        """Requests not answered yet, oldest first."""
        return [self._request(r) for r in self.store.query(
            "SELECT * FROM model_requests WHERE state='pending' ORDER BY id")]

    def get_request(self, request_id: int) -> ModelRequest | None:
        """One request, or None."""
        rows = self.store.query("SELECT * FROM model_requests WHERE id=?", (request_id,))
        return self._request(rows[0]) if rows else None

    def answer(self, request_id: int, state: RequestState, detail: str | None) -> None:
        """Record the outcome of a request."""
        with self.store.transaction() as db:
            db.execute("UPDATE model_requests SET state=?, detail=?, handled_at=? WHERE id=? "
                       "AND state='pending'", (state, detail, now(), request_id))

    def withdraw(self, request_id: int) -> bool:
        """Take back a request no service picked up; False when it was picked up."""
        with self.store.transaction() as db:
            cursor = db.execute("UPDATE model_requests SET state='withdrawn', handled_at=? "
                                "WHERE id=? AND state='pending'", (now(), request_id))
        return cursor.rowcount == 1

    @staticmethod
    def _request(row: Any) -> ModelRequest:
        return ModelRequest(row["id"], row["action"], json.loads(row["body"]), row["state"],
                            row["detail"])

    # -- rollouts ------------------------------------------------------------------------

    def create(self, rollout: Rollout, devices: dict[str, tuple[DeviceState, str | None]],
               ) -> Rollout:
        """Insert a new rollout and its devices; returns it with its id."""
        stamp = now()
        with self.store.transaction() as db:
            cursor = db.execute(
                "INSERT INTO rollouts(model, version, state, record, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?)", (rollout.model, rollout.version, rollout.state,
                                         json.dumps(rollout.record()), stamp, stamp))
            rollout.id = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT INTO rollout_devices(rollout, device_id, state, stage, detail, "
                "updated_at) VALUES (?,?,?,?,?,?)",
                [(rollout.id, d, state, None, detail, stamp)
                 for d, (state, detail) in devices.items()])
        return rollout

    def save(self, rollout: Rollout) -> None:
        """Rewrite a rollout's record (at transitions)."""
        with self.store.transaction() as db:
            db.execute("UPDATE rollouts SET state=?, record=?, updated_at=? WHERE id=?",
                       (rollout.state, json.dumps(rollout.record()), now(), rollout.id))

    def running(self) -> list[Rollout]:
        """Rollouts not finished (the manager resumes them after a restart)."""
        return [self._rollout(r) for r in self.store.query(
            "SELECT * FROM rollouts WHERE state NOT IN ('completed', 'aborted') ORDER BY id")]

    def latest(self, model: str) -> Rollout | None:
        """The model's most recent rollout."""
        rows = self.store.query("SELECT * FROM rollouts WHERE model=? ORDER BY id DESC LIMIT 1",
                                (model,))
        return self._rollout(rows[0]) if rows else None

    def get(self, rollout_id: int) -> Rollout | None:
        """One rollout."""
        rows = self.store.query("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def completed(self, model: str) -> list[Rollout]:
        """The model's completed rollouts, newest first."""
        return [self._rollout(r) for r in self.store.query(
            "SELECT * FROM rollouts WHERE model=? AND state='completed' ORDER BY id DESC",
            (model,))]

    def history(self, model: str, limit: int = 100) -> list[Rollout]:
        """The model's rollouts of any state, newest first."""
        return [self._rollout(r) for r in self.store.query(
            "SELECT * FROM rollouts WHERE model=? ORDER BY id DESC LIMIT ?", (model, limit))]

    @staticmethod
    def _rollout(row: Any) -> Rollout:
        record = json.loads(row["record"])
        return Rollout(id=row["id"], model=row["model"], version=row["version"],
                       state=row["state"], **record)

    # -- devices -------------------------------------------------------------------------

    def set_devices(self, rollout_id: int,
                    states: dict[str, tuple[DeviceState, int | None, str | None]]) -> None:
        """Record device states (state, stage, detail)."""
        stamp = now()
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO rollout_devices(rollout, device_id, state, stage, detail, "
                "updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT(rollout, device_id) DO UPDATE "
                "SET state=excluded.state, stage=COALESCE(excluded.stage, stage), "
                "detail=excluded.detail, updated_at=excluded.updated_at",
                [(rollout_id, d, s, stage, detail, stamp)
                 for d, (s, stage, detail) in states.items()])

    def devices(self, rollout_id: int) -> dict[str, dict[str, Any]]:
        """Device id -> {state, stage, detail, updated_at}."""
        return {r["device_id"]: {"state": r["state"], "stage": r["stage"],
                                 "detail": r["detail"], "updated_at": r["updated_at"]}
                for r in self.store.query(
                    "SELECT * FROM rollout_devices WHERE rollout=? ORDER BY device_id",
                    (rollout_id,))}

    # -- what is retained on the broker ----------------------------------------------------

    def publication(self, model: str) -> tuple[str | None, int]:
        """(version, chunk count) whose manifest and chunks are retained for ``model``."""
        rows = self.store.query("SELECT version, chunk_count FROM model_publications "
                                "WHERE model=?", (model,))
        return (rows[0]["version"], rows[0]["chunk_count"]) if rows else (None, 0)

    def published_variants(self, model: str) -> dict[str, int]:
        """The variants retained with the release of ``model``: version -> chunk count."""
        return {r["version"]: r["chunk_count"] for r in self.store.query(
            "SELECT version, chunk_count FROM model_publication_variants WHERE model=?",
            (model,))}

    def retained_builds(self, model: str) -> set[str]:
        """Every version whose chunks are retained for ``model`` (the release, its variants)."""
        published, _ = self.publication(model)
        return set(self.published_variants(model)) | ({published} if published else set())

    def set_publication(self, model: str, version: str | None, chunk_count: int,
                        variants: dict[str, int] | None = None) -> None:
        """Record what is retained (None: nothing), with the release's variants."""
        with self.store.transaction() as db:
            db.execute("INSERT INTO model_publications(model, version, chunk_count, "
                       "published_at) VALUES (?,?,?,?) ON CONFLICT(model) DO UPDATE SET "
                       "version=excluded.version, chunk_count=excluded.chunk_count, "
                       "published_at=excluded.published_at",
                       (model, version, chunk_count, now()))
            db.execute("DELETE FROM model_publication_variants WHERE model=?", (model,))
            db.executemany("INSERT INTO model_publication_variants(model, version, chunk_count)"
                           " VALUES (?,?,?)", [(model, v, n) for v, n in (variants or {}).items()])
