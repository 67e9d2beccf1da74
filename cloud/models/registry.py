"""The model registry: models, their versions, lineage, metrics and life cycle.

Rows live in the cloud's SQLite store (tables ``registry_models``, ``registry_versions``,
``registry_metrics``, ``registry_events``); the files live once each in a
content-addressed artifact folder (``{sha256[:2]}/{sha256}``), so a version
registered twice, or the same bytes under two versions, take the space once.

A version moves through ``draft → released → canary → active → rolled_back →
retired`` (and ``rejected`` for an optimizer output that lost too much
accuracy); :data:`TRANSITIONS` says which moves are allowed and every move is
an event row with its reason. Every method does disk work: call it off the
event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import semver

from cloud.files import write_atomic
from cloud.models.formats import ArtifactFormat
from cloud.storage.sqlite_store import SqliteStore
from schemas.base import now

logger = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS registry_models (
        name TEXT PRIMARY KEY, task TEXT, description TEXT, created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS registry_versions (
        model TEXT NOT NULL REFERENCES registry_models(name), version TEXT NOT NULL,
        format TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
        state TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        parent_version TEXT, task TEXT, fl_task TEXT, fl_round INTEGER,
        recipe TEXT NOT NULL DEFAULT '{}', requirements TEXT NOT NULL DEFAULT '{}',
        input_shape TEXT, note TEXT,
        PRIMARY KEY (model, version)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS registry_metrics (
        model TEXT NOT NULL, version TEXT NOT NULL, source TEXT NOT NULL,
        device_class TEXT NOT NULL DEFAULT '', name TEXT NOT NULL, value REAL NOT NULL,
        measured_at REAL NOT NULL,
        PRIMARY KEY (model, version, source, device_class, name)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS registry_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL,
        ts REAL NOT NULL, event TEXT NOT NULL, detail TEXT)""",
    "CREATE INDEX IF NOT EXISTS model_events_version ON registry_events(model, version)",
)


class VersionState(StrEnum):
    """Where a version is in its life cycle."""

    DRAFT = "draft"
    RELEASED = "released"
    CANARY = "canary"
    ACTIVE = "active"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"
    REJECTED = "rejected"


_S = VersionState
TRANSITIONS: Mapping[VersionState, frozenset[VersionState]] = {
    _S.DRAFT: frozenset({_S.RELEASED, _S.CANARY, _S.REJECTED, _S.RETIRED}),
    _S.REJECTED: frozenset({_S.RELEASED, _S.CANARY, _S.RETIRED}),  # release --force
    _S.RELEASED: frozenset({_S.CANARY, _S.ACTIVE, _S.ROLLED_BACK, _S.RETIRED}),
    _S.CANARY: frozenset({_S.ACTIVE, _S.ROLLED_BACK, _S.RETIRED}),
    _S.ACTIVE: frozenset({_S.ROLLED_BACK, _S.RETIRED, _S.CANARY, _S.RELEASED}),
    _S.ROLLED_BACK: frozenset({_S.RELEASED, _S.CANARY, _S.ACTIVE, _S.RETIRED}),
    _S.RETIRED: frozenset(),
}
"""Allowed moves. ``active → canary/released`` is a version that is rolled out again."""


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why in one line."""


class NotFoundError(RegistryError):
    """No such model or version."""


class VersionExistsError(RegistryError):
    """The version is registered already, with other content."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered version of a model."""

    model: str
    version: str
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    state: VersionState
    created_at: float
    updated_at: float
    path: Path
    parent_version: str | None = None
    task: str | None = None
    fl_task: str | None = None
    fl_round: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    requirements: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    note: str | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready view (``edgefl model show --json``)."""
        return {
            "model": self.model, "version": self.version, "format": self.format.value,
            "sha256": self.sha256, "size_bytes": self.size_bytes, "state": self.state.value,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "parent_version": self.parent_version, "task": self.task,
            "fl_task": self.fl_task, "fl_round": self.fl_round, "recipe": self.recipe,
            "requirements": self.requirements, "input_shape": self.input_shape,
            "note": self.note, "path": str(self.path),
        }


@dataclass(frozen=True, slots=True)
class Metric:
    """One figure about a version, from where it was measured."""

    source: str
    device_class: str
    name: str
    value: float
    measured_at: float


@dataclass(frozen=True, slots=True)
class Event:
    """One life-cycle event of a version."""

    ts: float
    event: str
    detail: str | None


def parse_version(version: str) -> semver.Version:
    """A semantic version (``MAJOR.MINOR.PATCH[-pre][+build]``).

    Raises:
        RegistryError: not a semantic version.
    """
    try:
        return semver.Version.parse(version)
    except (ValueError, TypeError):
        raise RegistryError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)") \
            from None


class ArtifactStore:
    """Model files by content: ``{root}/{sha[:2]}/{sha}``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the file with this digest lives."""
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its SHA-256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists() and self._intact(target, digest):
            return digest
        write_atomic(target, data)
        return digest

    def read(self, sha256: str) -> bytes:
        """The file's bytes, checked against its digest.

        Raises:
            RegistryError: missing or corrupted.
        """
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"artifact {sha256[:12]} is missing from {self.root}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RegistryError(f"artifact {sha256[:12]} is corrupted (digest differs)")
        return data

    def remove(self, sha256: str) -> None:
        """Delete one artifact (when no version refers to it any more)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    @staticmethod
    def _intact(path: Path, digest: str) -> bool:
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest() == digest


class ModelRegistry:
    """Models and versions in the cloud store; files in the artifact store."""

    def __init__(self, store: SqliteStore, artifacts: Path) -> None:
        self.store = store
        self.artifacts = ArtifactStore(artifacts)
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    # -- writing -----------------------------------------------------------------------

    def register(self, model: str, version: str, data: bytes, fmt: ArtifactFormat, *,
                 task: str | None = None, parent_version: str | None = None,
                 fl_task: str | None = None, fl_round: int | None = None,
                 recipe: Mapping[str, Any] | None = None,
                 requirements: Mapping[str, Any] | None = None,
                 input_shape: list[int] | None = None, note: str | None = None,
                 state: VersionState = VersionState.DRAFT,
                 metrics: Mapping[str, float] | None = None,
                 metrics_source: str = "register") -> ModelVersion:
        """Add a version (and its model, the first time).

        Registering the same bytes again under the same version is a no-op that returns
        the existing version (a coordinator that restarts registers again).

        Raises:
            RegistryError: not a semantic version, the version exists with other bytes, or
                the parent version does not exist.
        """
        parse_version(version)
        if not data:
            raise RegistryError("an empty file is not a model")
        digest = self.artifacts.put(data)
        stamp = now()
        with self.store.transaction() as db:
            existing = db.execute(
                "SELECT sha256 FROM registry_versions WHERE model=? AND version=?",
                (model, version)).fetchone()
            if existing is not None:
                if existing["sha256"] != digest:
                    raise VersionExistsError(f"{model} {version} is already registered with other "
                                        "content: register a new version")
                return self.get(model, version)
            if parent_version is not None and db.execute(
                    "SELECT 1 FROM registry_versions WHERE model=? AND version=?",
                    (model, parent_version)).fetchone() is None:
                raise RegistryError(f"parent version {model} {parent_version} is not registered")
            db.execute("INSERT OR IGNORE INTO registry_models(name, task, created_at) "
                       "VALUES (?,?,?)", (model, task, stamp))
            db.execute(
                "INSERT INTO registry_versions(model, version, format, sha256, size_bytes, state, "
                "created_at, updated_at, parent_version, task, fl_task, fl_round, recipe, "
                "requirements, input_shape, note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (model, version, fmt.value, digest, len(data), state.value, stamp, stamp,
                 parent_version, task, fl_task, fl_round, json.dumps(dict(recipe or {})),
                 json.dumps(dict(requirements or {})),
                 None if input_shape is None else json.dumps(input_shape), note))
            self._event(db, model, version, "registered",
                        f"{fmt.value}, {len(data)} bytes, state {state.value}")
            if metrics:
                self._put_metrics(db, model, version, metrics_source, "", metrics, stamp)
        logger.info("registered %s %s (%s, %d bytes, %s)", model, version, fmt.value, len(data),
                    state.value)
        return self.get(model, version)

    def set_state(self, model: str, version: str, state: VersionState, reason: str) -> None:
        """Move a version to ``state``.

        Raises:
            NotFoundError: no such version.
            RegistryError: the move is not allowed from its current state.
        """
        with self.store.transaction() as db:
            current = self._state(db, model, version)
            if current is state:
                return
            if state not in TRANSITIONS[current]:
                raise RegistryError(f"{model} {version} is {current.value}: it cannot become "
                                    f"{state.value}")
            db.execute("UPDATE registry_versions SET state=?, updated_at=? WHERE model=? AND "
                       "version=?", (state.value, now(), model, version))
            self._event(db, model, version, state.value, reason)
        logger.info("%s %s: %s -> %s (%s)", model, version, current.value, state.value, reason)

    def add_metrics(self, model: str, version: str, source: str, values: Mapping[str, float],
                    *, device_class: str = "") -> None:
        """Record figures about a version (a newer figure of the same name replaces).

        Raises:
            NotFoundError: no such version.
        """
        with self.store.transaction() as db:
            self._state(db, model, version)
            self._put_metrics(db, model, version, source, device_class, values, now())

    def record_event(self, model: str, version: str, event: str, detail: str | None) -> None:
        """Add an event that is not a state change (a rollout step, a refusal)."""
        with self.store.transaction() as db:
            self._event(db, model, version, event, detail)

    # -- reading -----------------------------------------------------------------------

    def get(self, model: str, version: str) -> ModelVersion:
        """One version.

        Raises:
            NotFoundError: no such version.
        """
        rows = self.store.query("SELECT * FROM registry_versions WHERE model=? AND version=?",
                                (model, version))
        if not rows:
            if not self.store.query("SELECT 1 FROM registry_models WHERE name=?", (model,)):
                raise NotFoundError(f"no model named {model!r}")
            raise NotFoundError(f"model {model!r} has no version {version!r}")
        return self._version(rows[0])

    def versions(self, model: str) -> list[ModelVersion]:
        """Every version of a model, oldest semantic version first.

        Raises:
            NotFoundError: no such model.
        """
        rows = self.store.query("SELECT * FROM registry_versions WHERE model=?", (model,))
        if not rows and not self.store.query("SELECT 1 FROM registry_models WHERE name=?",
                                             (model,)):
            raise NotFoundError(f"no model named {model!r}")
        return sorted((self._version(r) for r in rows),
                      key=lambda v: parse_version(v.version))

    def models(self) -> list[dict[str, Any]]:
        """Each model with its version count, newest version and the version(s) active."""
        out: list[dict[str, Any]] = []
        for row in self.store.query(
                "SELECT name, task, created_at FROM registry_models ORDER BY name"):
            versions = self.versions(row["name"])
            out.append({
                "name": row["name"], "task": row["task"], "created_at": row["created_at"],
                "versions": len(versions),
                "latest": versions[-1].version if versions else None,
                "active": [v.version for v in versions if v.state is VersionState.ACTIVE],
            })
        return out

    def metrics(self, model: str, version: str) -> list[Metric]:
        """Every figure recorded about a version."""
        return [Metric(r["source"], r["device_class"], r["name"], r["value"], r["measured_at"])
                for r in self.store.query(
                    "SELECT * FROM registry_metrics WHERE model=? AND version=? "
                    "ORDER BY source, device_class, name", (model, version))]

    def events(self, model: str, version: str) -> list[Event]:
        """The version's history, oldest first."""
        return [Event(r["ts"], r["event"], r["detail"]) for r in self.store.query(
            "SELECT ts, event, detail FROM registry_events WHERE model=? AND version=? "
            "ORDER BY id", (model, version))]

    def lineage(self, model: str, version: str) -> list[ModelVersion]:
        """The version, its parent, the parent's parent... (a cycle cannot be registered)."""
        chain = [self.get(model, version)]
        while chain[-1].parent_version is not None:
            chain.append(self.get(model, chain[-1].parent_version))
        return chain

    def children(self, model: str, version: str) -> list[ModelVersion]:
        """Versions derived from this one (optimizer outputs)."""
        return [self._version(r) for r in self.store.query(
            "SELECT * FROM registry_versions WHERE model=? AND parent_version=? "
            "ORDER BY created_at", (model, version))]

    def read(self, version: ModelVersion) -> bytes:
        """The version's file, checked against its digest."""
        return self.artifacts.read(version.sha256)

    # -- internals ---------------------------------------------------------------------

    def _state(self, db: sqlite3.Connection, model: str, version: str) -> VersionState:
        row = db.execute("SELECT state FROM registry_versions WHERE model=? AND version=?",
                         (model, version)).fetchone()
        if row is None:
            raise NotFoundError(f"model {model!r} has no version {version!r}")
        return VersionState(row["state"])

    @staticmethod
    def _event(db: sqlite3.Connection, model: str, version: str, event: str,
               detail: str | None) -> None:
        db.execute("INSERT INTO registry_events(model, version, ts, event, detail) "
                   "VALUES (?,?,?,?,?)", (model, version, now(), event, detail))

    @staticmethod
    def _put_metrics(db: sqlite3.Connection, model: str, version: str, source: str,
                     device_class: str, values: Mapping[str, float], stamp: float) -> None:
        rows: Iterable[tuple[Any, ...]] = (
            (model, version, source, device_class, name, float(value), stamp)
            for name, value in values.items())
        db.executemany(
            "INSERT INTO registry_metrics(model, version, source, device_class, name, value, "
            "measured_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(model, version, source, "
            "device_class, name) DO UPDATE SET value=excluded.value, "
            "measured_at=excluded.measured_at", rows)

    def _version(self, row: sqlite3.Row) -> ModelVersion:
        return ModelVersion(
            model=row["model"], version=row["version"], format=ArtifactFormat(row["format"]),
            sha256=row["sha256"], size_bytes=row["size_bytes"],
            state=VersionState(row["state"]), created_at=row["created_at"],
            updated_at=row["updated_at"], path=self.artifacts.path(row["sha256"]),
            parent_version=row["parent_version"], task=row["task"], fl_task=row["fl_task"],
            fl_round=row["fl_round"], recipe=json.loads(row["recipe"]),
            requirements=json.loads(row["requirements"]),
            input_shape=None if row["input_shape"] is None else json.loads(row["input_shape"]),
            note=row["note"])
