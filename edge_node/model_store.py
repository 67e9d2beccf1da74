"""Models on disk: A/B slots per model, the active/previous record, and chunk staging.

Layout under ``state_dir/models``::

    {model}/state.json          active + previous install, written atomically
    {model}/A/model.{ext}       slot A
    {model}/B/model.{ext}       slot B
    {model}/staging/{version}-{sha}/download.{ext}   the release, preallocated; each
                                                     chunk written at its offset
    {model}/staging/{version}-{sha}/chunks.log       indexes of the chunks written

A new version always goes into the slot that is not active, so the previous
model stays on disk for a rollback. ``state.json`` is the commit point.

A download is one file, not a file per chunk: the chunks land at their offsets and
the verified file is renamed into its slot, so the bytes are written once and synced
once (on an SD card, a sync per chunk and a second copy to assemble cost more than
the transfer). Neither the file nor the log is synced per chunk: a process that dies
leaves both in the page cache, and after a power loss a chunk the log lists may be
torn, which the release's sha256 catches (the download then starts over).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
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
_LOG_RECORD = struct.Struct("<I")
"""One written chunk's index in ``chunks.log`` (a torn last record is ignored)."""


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
        self._states: dict[str, dict[str, dict[str, object] | None]] = {}
        self._lock = threading.Lock()  # the OTA thread writes; any thread may read

    def _folder(self, model: str) -> Path:
        return self.root / validate_id(model, "model")

    def _state(self, model: str) -> dict[str, dict[str, object] | None]:
        """The install record, read from disk once (this store is its only writer)."""
        with self._lock:
            cached = self._states.get(model)
            if cached is not None:
                return cached
            path = self._folder(model) / "state.json"
            if not path.exists():
                return {"active": None, "previous": None}
            data: dict[str, dict[str, object] | None] = json.loads(path.read_text())
            self._states[model] = data
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
        with self._lock:
            write_atomic(self._folder(model) / "state.json",
                         json.dumps(body, indent=2, sort_keys=True).encode())
            self._states[model] = json.loads(json.dumps(body))

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

    def download_file(self, manifest: ReleaseManifest) -> Path:
        """The file a release is downloaded into (its extension names the format)."""
        return self.staging_dir(manifest) / f"download.{EXTENSIONS[manifest.format]}"

    def _chunk_log(self, manifest: ReleaseManifest) -> Path:
        return self.staging_dir(manifest) / "chunks.log"

    def present_chunks(self, manifest: ReleaseManifest) -> set[int]:
        """Chunk indexes already written to the release's download file."""
        try:
            if self.download_file(manifest).stat().st_size != manifest.size_bytes:
                return set()
            raw = self._chunk_log(manifest).read_bytes()
        except FileNotFoundError:
            return set()
        whole = len(raw) - len(raw) % _LOG_RECORD.size
        return {index for (index,) in _LOG_RECORD.iter_unpack(raw[:whole])
                if index < manifest.chunk_count}

    def open_download(self, manifest: ReleaseManifest) -> set[int]:
        """Prepare the download file; returns the chunks a previous run wrote to it.

        The file's full size is reserved on disk, so a full disk fails here, not halfway.
        """
        present = self.present_chunks(manifest)
        if present:
            return present
        self.discard_staging(manifest)
        folder = self.staging_dir(manifest)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.download_file(manifest), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, manifest.size_bytes)
            else:  # pragma: no cover - not Linux
                os.ftruncate(fd, manifest.size_bytes)
        finally:
            os.close(fd)
        return present

    def store_chunk(self, manifest: ReleaseManifest, index: int, data: bytes) -> None:
        """Write one chunk at its offset, then list it in the chunk log.

        A restart resumes from the listed ones. ``open_download`` comes first.
        """
        offset = index * manifest.chunk_size
        view = memoryview(data)
        fd = os.open(self.download_file(manifest), os.O_WRONLY)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
        with self._chunk_log(manifest).open("ab") as log:
            log.write(_LOG_RECORD.pack(index))

    def read_chunk(self, manifest: ReleaseManifest, index: int) -> bytes:
        """Chunk ``index`` as written to the download file."""
        with self.download_file(manifest).open("rb") as handle:
            handle.seek(index * manifest.chunk_size)
            return handle.read(manifest.chunk_length(index))

    def complete_download(self, manifest: ReleaseManifest) -> Path:
        """Sync the downloaded file to disk (once, before it is verified and placed)."""
        path = self.download_file(manifest)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

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
