"""Models on disk: A/B slots per model, the active/previous record, and chunk staging.

Layout under ``state_dir/models``::

    {model}/state.json          active + previous install, written atomically
    {model}/A/model.{ext}       slot A
    {model}/B/model.{ext}       slot B
    {model}/staging/{version}-{sha}/chunk-{i}   chunks downloaded so far

A new version always goes into the slot that is not active, so the previous
model stays on disk for a rollback. ``state.json`` is the commit point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from schemas.base import ModelFormat
from schemas.release import ReleaseManifest
from schemas.topics import validate_id, validate_version

logger = logging.getLogger(__name__)

Slot = Literal["A", "B"]
EXTENSIONS: dict[ModelFormat, str] = {
    ModelFormat.ONNX: "onnx",
    ModelFormat.TFLITE: "tflite",
    ModelFormat.TORCHSCRIPT: "pt",
}


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """One installed version."""

    version: str
    format: ModelFormat
    sha256: str
    size_bytes: int
    slot: Slot
    path: str


def write_atomic(path: Path, data: bytes, *, durable_name: bool = True) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``.

    With ``durable_name`` the folder is synced too, so the rename survives a power
    loss. Without it, a crash may lose the new name (the file is then simply
    missing, never partial): right for what can be fetched again, like a chunk.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable_name:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ModelStore:
    """A/B slots and install records of every model on this device."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _folder(self, model: str) -> Path:
        return self.root / validate_id(model, "model")

    def _state(self, model: str) -> dict[str, dict[str, object] | None]:
        path = self._folder(model) / "state.json"
        if not path.exists():
            return {"active": None, "previous": None}
        data: dict[str, dict[str, object] | None] = json.loads(path.read_text())
        return data

    @staticmethod
    def _installed(record: dict[str, object] | None) -> InstalledModel | None:
        if record is None:
            return None
        return InstalledModel(
            version=str(record["version"]), format=ModelFormat(str(record["format"])),
            sha256=str(record["sha256"]), size_bytes=int(str(record["size_bytes"])),
            slot="A" if record["slot"] == "A" else "B", path=str(record["path"]),
        )

    def models(self) -> list[str]:
        """Names of models with an install record."""
        return sorted(p.parent.name for p in self.root.glob("*/state.json"))

    def active(self, model: str) -> InstalledModel | None:
        """The version serving now."""
        return self._installed(self._state(model)["active"])

    def previous(self, model: str) -> InstalledModel | None:
        """The version a rollback returns to."""
        return self._installed(self._state(model)["previous"])

    def target_slot(self, model: str) -> Slot:
        """The slot a new install goes to: the one not active."""
        active = self.active(model)
        return "B" if active is not None and active.slot == "A" else "A"

    def slot_file(self, model: str, slot: Slot, fmt: ModelFormat) -> Path:
        """Where a model file of ``fmt`` lives in ``slot``."""
        return self._folder(model) / slot / f"model.{EXTENSIONS[fmt]}"

    def _write_state(self, model: str, active: InstalledModel | None,
                     previous: InstalledModel | None) -> None:
        body = {"active": asdict(active) if active else None,
                "previous": asdict(previous) if previous else None}
        write_atomic(self._folder(model) / "state.json",
                     json.dumps(body, indent=2, sort_keys=True).encode())

    def commit(self, model: str, installed: InstalledModel) -> InstalledModel | None:
        """Make ``installed`` active; the old active becomes previous. Returns it."""
        old = self.active(model)
        self._write_state(model, installed, old)
        return old

    def rollback(self, model: str) -> InstalledModel | None:
        """Swap active and previous; returns the new active (None if no previous)."""
        active, previous = self.active(model), self.previous(model)
        if previous is None:
            return None
        self._write_state(model, previous, active)
        return previous

    # -- staging -------------------------------------------------------------

    def staging_dir(self, manifest: ReleaseManifest) -> Path:
        """Folder for the chunks of one release (version and sha256 in the name)."""
        validate_version(manifest.version)
        return (self._folder(manifest.model) / "staging"
                / f"{manifest.version}-{manifest.sha256[:16]}")

    def present_chunks(self, manifest: ReleaseManifest) -> set[int]:
        """Chunk indexes already on disk with the right length."""
        folder = self.staging_dir(manifest)
        present: set[int] = set()
        if not folder.exists():
            return present
        for path in folder.glob("chunk-*"):
            try:
                index = int(path.name.removeprefix("chunk-"))
            except ValueError:
                continue
            if (0 <= index < manifest.chunk_count
                    and path.stat().st_size == manifest.chunk_length(index)):
                present.add(index)
        return present

    def store_chunk(self, manifest: ReleaseManifest, index: int, data: bytes) -> None:
        """Keep one chunk: it survives reconnects and restarts.

        After a power loss it is whole or missing, and a missing one is fetched again.
        """
        write_atomic(self.staging_dir(manifest) / f"chunk-{index}", data, durable_name=False)

    def assemble(self, manifest: ReleaseManifest, target: Path) -> str:
        """Concatenate the chunks into ``target`` atomically; returns the file's sha256."""
        folder = self.staging_dir(manifest)
        digest = hashlib.sha256()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("wb") as out:
            for index in range(manifest.chunk_count):
                data = (folder / f"chunk-{index}").read_bytes()
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        return digest.hexdigest()

    def discard_staging(self, manifest: ReleaseManifest) -> None:
        """Remove a release's chunks (after install, or when they proved bad)."""
        shutil.rmtree(self.staging_dir(manifest), ignore_errors=True)

    def place(self, assembled: Path, model: str, slot: Slot, fmt: ModelFormat) -> Path:
        """Move a verified, smoke-tested file into ``slot`` (rename on one filesystem)."""
        target = self.slot_file(model, slot, fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob("model.*"):
            if stale != target:
                stale.unlink()
        os.replace(assembled, target)
        fsync_dir(target.parent)
        return target
