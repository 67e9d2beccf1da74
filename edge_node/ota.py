"""Over-the-air model installs, verified, atomic, with rollback.

Manifest -> signature -> compatibility -> chunks -> size + sha256 -> load +
smoke test -> A/B switch -> report; rollback on demand or when the new model's
error rate is too high during its probation window.

All work runs on one thread fed by a queue, so the MQTT network thread only
enqueues. A model that fails any step is never activated: the previous one
keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import JsonValue

from edge_node.counters import Counters
from edge_node.errors import EdgeError, InstallError, ModelLoadError, RuntimeUnavailableError
from edge_node.inference import InferenceRuntime, load_runtime
from edge_node.inference_service import InferenceService, MiB, rss_bytes
from edge_node.job_thread import JobThread
from edge_node.model_store import EXTENSIONS, InstalledModel, ModelStore
from edge_node.release_verify import verify_manifest
from edge_node.settings import OtaSettings
from schemas.base import ModelFormat, RuntimeName, decode_message, now
from schemas.device import DeploymentState, DeploymentStatus
from schemas.errors import DecodeError
from schemas.release import ReleaseManifest
from schemas.topics import Topics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this device can run, for the compatibility check."""

    formats: frozenset[ModelFormat]
    runtimes: frozenset[RuntimeName]
    gpu: bool
    available_memory_mb: Callable[[], float]
    device_class: str = ""
    """``machine/Ncpu`` (:func:`schemas.device.device_class`): picks a release's build."""


def compatibility_problems(manifest: ReleaseManifest, caps: Capabilities) -> list[str]:
    """Why this device cannot run the release (empty when it can)."""
    reqs = manifest.targeting.requirements
    problems = []
    if manifest.format not in caps.formats:
        have = ", ".join(sorted(f.value for f in caps.formats)) or "none"
        problems.append(f"format {manifest.format.value} not supported (have: {have})")
    if reqs.formats and not set(reqs.formats) & caps.formats:
        problems.append("none of the required formats "
                        f"{sorted(f.value for f in reqs.formats)} is supported")
    if reqs.runtimes and not set(reqs.runtimes) & caps.runtimes:
        problems.append(f"none of the required runtimes {sorted(r.value for r in reqs.runtimes)}"
                        " is installed")
    available = caps.available_memory_mb()
    if reqs.min_memory_mb > available:
        problems.append(f"needs {reqs.min_memory_mb:.0f} MiB available, has {available:.0f} MiB")
    if reqs.gpu and not caps.gpu:
        problems.append("needs a GPU")
    return problems


def choose_build(manifest: ReleaseManifest, caps: Capabilities, device_class: str,
                 skip: Callable[[ReleaseManifest], bool] = lambda _: False,
                 ) -> tuple[ReleaseManifest | None, list[str]]:
    """The build of a release this device takes, or None and why none fits.

    The candidates are the release's own build and its variants, in the order
    ``prefer`` gives for ``device_class`` (then the manifest's order); the first
    one this device can run and that ``skip`` does not exclude is taken.
    """
    builds = manifest.builds()
    preferred = manifest.prefer.get(device_class, [])
    rank = {version: i for i, version in enumerate(preferred)}
    builds.sort(key=lambda b: rank.get(b.version, len(rank)))  # stable: manifest order
    reasons: list[str] = []
    for build in builds:
        if skip(build):
            continue
        problems = compatibility_problems(build, caps)
        if not problems:
            return build, []
        reasons += problems if len(builds) == 1 else [f"{build.version}: {p}" for p in problems]
    return None, reasons


@dataclass
class Download:
    """A release being fetched; its sha256 is computed as the chunks arrive in order."""

    manifest: ReleaseManifest
    missing: set[int]
    resumed: bool = False
    """Some chunks came from the disk (a previous run); after a power loss one may be torn."""
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    hashed: int = 0
    """Chunks ``[0, hashed)`` are in ``digest``."""
    progress_at: float = 0.0
    """When the last ``downloading`` progress status was sent (monotonic)."""
    stored: list[int] = field(default_factory=list)
    """Chunks written whose topics are still subscribed (unsubscribed in batches)."""


PROGRESS_INTERVAL_S = 1.0
"""At most one ``downloading`` progress status per this many seconds and download."""

UNSUBSCRIBE_BATCH = 16
"""Stored chunks are unsubscribed this many at a time (one UNSUBSCRIBE packet), at each
progress status, at the agent's report tick and when the download ends. A reconnect in
between gets those retained chunks again, counted as ``chunk_duplicate``."""


@dataclass
class BenchDownload:
    """A release fetched to be timed (``benchmark`` command), never installed."""

    manifest: ReleaseManifest
    options: dict[str, int]
    reply: BenchReply
    chunks: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def topics(self, topics: Topics) -> list[str]:
        """Its chunk topics."""
        return [topics.chunk(self.manifest.model, self.manifest.version, i)
                for i in range(self.manifest.chunk_count)]


BENCH_TIMEOUT_S = 300.0
"""A benchmark whose chunks have not all arrived by then is answered with an error."""
BenchReply = Callable[[dict[str, JsonValue] | None, str | None], None]
PublishStatus = Callable[[DeploymentStatus], None]
ChunkSubscriptions = Callable[[list[str], bool], None]
"""(topics, subscribe?) - subscribe to or drop chunk topics."""


class OtaManager:
    """Installs, rolls back and watches models on one device."""

    def __init__(
        self,
        *,
        device_id: str,
        topics: Topics,
        store: ModelStore,
        inference: InferenceService,
        settings: OtaSettings,
        keys: dict[str, Ed25519PublicKey],
        capabilities: Capabilities,
        publish_status: PublishStatus,
        chunk_subscriptions: ChunkSubscriptions,
        counters: Counters,
        threads: int = 1,
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self.store = store
        self.inference = inference
        self.settings = settings
        self.keys = keys
        self.caps = capabilities
        self._publish_status = publish_status
        self._chunks = chunk_subscriptions
        self.counters = counters
        self.threads = threads
        self.downloads: dict[str, Download] = {}
        self.benchmarks: dict[tuple[str, str], BenchDownload] = {}
        self.chunk_messages: Counter[str] = Counter()
        self.probation: dict[str, tuple[float, str]] = {}
        self._failed: set[tuple[str, str, str]] = set()
        self._jobs = JobThread(f"ota-{device_id}", "ota", counters,
                               (EdgeError, DecodeError, OSError, ValueError))

    # -- thread ----------------------------------------------------------------

    def start(self) -> None:
        """Start the install thread."""
        self._jobs.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Unsubscribe the stored chunks of unfinished downloads, then end the thread."""
        self._jobs.put(self._unsubscribe_all_stored)
        self._jobs.stop(timeout)

    def _unsubscribe_all_stored(self) -> None:
        for model, download in self.downloads.items():
            self._unsubscribe_stored(model, download)

    def call(self, fn: Callable[[], DeploymentStatus], timeout: float = 60.0) -> DeploymentStatus:
        """Run ``fn`` on the install thread and wait (bounded) for its result.

        The future always completes: any exception of ``fn`` is handed to the caller.
        """
        future: Future[DeploymentStatus] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                future.set_exception(exc)

        self._jobs.put(job)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # not started yet: it never will be
            raise

    def submit_call(self, fn: Callable[[], DeploymentStatus],
                    done: Callable[[DeploymentStatus | None, BaseException | None], None],
                    ) -> None:
        """Run ``fn`` on the install thread; ``done(status, error)`` runs there afterwards."""
        def job() -> None:
            try:
                status = fn()
            except Exception as exc:  # handed to ``done``, which reports it  # noqa: BLE001
                done(None, exc)
            else:
                done(status, None)

        self._jobs.put(job)

    # -- entry points (any thread) ---------------------------------------------

    def submit_release(self, model: str, payload: bytes) -> None:
        """A retained manifest arrived on ``models/{model}/release``."""
        self._jobs.put(lambda: self._on_release(model, payload))

    def submit_chunk(self, model: str, version: str, index: int, payload: bytes) -> None:
        """A chunk arrived."""
        self._jobs.put(lambda: self._on_chunk(model, version, index, payload))

    def rollback(self, model: str, reason: str) -> DeploymentStatus:
        """Return to the previous slot (on the install thread); raises InstallError."""
        return self.call(lambda: self._rollback(model, reason))

    def submit_rollback(self, model: str, reason: str,
                        done: Callable[[DeploymentStatus | None, BaseException | None], None],
                        ) -> None:
        """Queue a rollback; ``done`` is called on the install thread when it ended."""
        self.submit_call(lambda: self._rollback(model, reason), done)


    def check_probation(self) -> None:
        """Queue the periodic housekeeping.

        Probation checks of freshly installed models, benchmark downloads that timed
        out, stored chunks whose topics are still subscribed.
        """
        self._jobs.put(self._check_probation)

    # -- status ---------------------------------------------------------------

    def _status(self, model: str, state: DeploymentState, *, manifest: ReleaseManifest | None
                = None, error: str | None = None, reasons: list[str] | None = None,
                received: int | None = None) -> DeploymentStatus:
        active, previous = self.store.active(model), self.store.previous(model)
        status = DeploymentStatus(
            device_id=self.device_id, model=model, ts=now(), state=state,
            target_version=manifest.version if manifest else None,
            active_version=active.version if active else None,
            previous_version=previous.version if previous else None,
            slot=active.slot if active else None,
            chunks_received=received, chunks_total=manifest.chunk_count if manifest else None,
            error=error, reasons=reasons or [],
        )
        self._publish_status(status)
        return status

    def _fail(self, model: str, manifest: ReleaseManifest | None, reason: str,
              detail: str, *, retry: bool = False) -> None:
        """Report a failed install; unless ``retry``, this build is not tried again.

        ``retry`` is for the device's own trouble, like a full disk: the next delivery
        of the release tries again.
        """
        self.counters.add(f"install_{reason}")
        logger.warning("%s: install of %s %s refused: %s: %s", self.device_id, model,
                       manifest.version if manifest else "?", reason, detail)
        if manifest is not None:
            if not retry:
                self._failed.add((model, manifest.version, manifest.sha256))
            self._drop_download(model)
        self._status(model, DeploymentState.FAILED, manifest=manifest,
                     error=f"{reason}: {detail}"[:1024])

    # -- restore --------------------------------------------------------------

    def restore(self) -> list[str]:
        """Load every model's active slot from disk (before the network is up)."""
        restored = []
        for model in self.store.models():
            installed = self.store.active(model)
            if installed is None:
                continue
            try:
                runtime, memory = self._load(installed.path, installed.format)
            except (ModelLoadError, RuntimeUnavailableError) as exc:
                self.counters.add("restore_failed")
                logger.error("%s: cannot restore %s %s: %s", self.device_id, model,  # noqa: TRY400
                             installed.version, exc)
                continue
            self.inference.activate(model, installed, runtime, memory)
            restored.append(model)
        return restored

    def _load(self, path: str, fmt: ModelFormat) -> tuple[InferenceRuntime, float]:
        before = rss_bytes()
        runtime = load_runtime(Path(path), fmt, threads=self.threads)
        return runtime, max(0.0, (rss_bytes() - before) / MiB)

    # -- release --------------------------------------------------------------

    def _on_release(self, model: str, payload: bytes) -> None:
        if not payload:  # release withdrawn (retained message cleared)
            self._drop_download(model)
            return
        try:
            manifest = decode_message(ReleaseManifest, payload)
        except DecodeError as exc:
            self._fail(model, None, "invalid_manifest", exc.detail)
            return
        if manifest.model != model:
            self._fail(model, None, "invalid_manifest",
                       f"manifest names model {manifest.model!r}")
            return
        if not manifest.targeting.targets(self.device_id):
            logger.debug("%s: release %s %s not for this device", self.device_id, model,
                         manifest.version)
            return
        picked = self._pick(model, manifest)
        if picked is None:
            return
        manifest = picked
        if manifest.size_bytes > self.settings.max_model_bytes:
            self._fail(model, manifest, "too_large",
                       f"{manifest.size_bytes} bytes > {self.settings.max_model_bytes}")
            return
        self._drop_download(model)
        self._begin_download(model, manifest)

    def _storage_failed(self, model: str, manifest: ReleaseManifest, exc: OSError) -> None:
        """The device's disk refused (full, read-only, failing).

        The model serving now stays; the release is tried when it is delivered again.
        """
        self.store.discard_staging(manifest)
        self._fail(model, manifest, "storage_error", str(exc), retry=True)

    def _begin_download(self, model: str, manifest: ReleaseManifest) -> None:
        try:
            present = self.store.open_download(manifest)
        except OSError as exc:
            self._storage_failed(model, manifest, exc)
            return
        download = Download(manifest, set(range(manifest.chunk_count)) - present,
                            resumed=bool(present), progress_at=time.monotonic())
        if present:  # a killed run may have left them subscribed on the broker's session
            self._chunks([self.topics.chunk(model, manifest.version, i)
                          for i in sorted(present)], False)
        self._advance_hash(download)
        self.downloads[model] = download
        self._status(model, DeploymentState.DOWNLOADING, manifest=manifest,
                     received=len(present))
        if download.missing:
            self._chunks([self.topics.chunk(model, manifest.version, i)
                          for i in sorted(download.missing)], True)
        else:
            self._finish(model, download)

    def _pick(self, model: str, release: ReleaseManifest) -> ReleaseManifest | None:
        """The build of a verified release to install; None when there is nothing to do."""
        active = self.store.active(model)
        for own in release.builds():
            if active is not None and (active.version, active.sha256) == (own.version,
                                                                          own.sha256):
                self._status(model, DeploymentState.INSTALLED, manifest=own)
                return None
        build, problems = choose_build(
            release, self.caps, self.caps.device_class,
            lambda b: (model, b.version, b.sha256) in self._failed)
        if build is None and not problems:
            return None  # every build this device could take failed here before
        current = self.downloads.get(model)
        if build is not None and current is not None and current.manifest == build:
            return None  # the retained manifest again (after a reconnect): keep downloading
        try:
            verify_manifest(release, self.keys)
        except InstallError as exc:
            self._fail(model, build or release, exc.reason, exc.detail)
            return None
        if build is None:
            self.counters.add("install_incompatible")
            self._failed.add((model, release.version, release.sha256))
            self._status(model, DeploymentState.INCOMPATIBLE, manifest=release,
                         reasons=problems)
            return None
        return build

    def _drop_download(self, model: str) -> None:
        download = self.downloads.pop(model, None)
        if download is not None:
            m = download.manifest
            self._chunks([self.topics.chunk(model, m.version, i)
                          for i in sorted(download.missing) + download.stored], False)

    def _unsubscribe_stored(self, model: str, download: Download) -> None:
        if download.stored:
            version = download.manifest.version
            self._chunks([self.topics.chunk(model, version, i) for i in download.stored],
                         False)
            download.stored.clear()

    # -- chunks ---------------------------------------------------------------

    def _on_chunk(self, model: str, version: str, index: int, payload: bytes) -> None:
        self.chunk_messages[model] += 1
        bench = self.benchmarks.get((model, version))
        if bench is not None:
            self._bench_chunk(bench, index, payload)
        download = self.downloads.get(model)
        if download is None or download.manifest.version != version:
            if bench is None:
                self.counters.add("chunk_unexpected")
            return
        manifest = download.manifest
        if index >= manifest.chunk_count:
            self.counters.add("chunk_out_of_range")
            logger.warning("%s: chunk %d of %s %s out of range (%d chunks)", self.device_id,
                           index, model, version, manifest.chunk_count)
            return
        if index not in download.missing:
            self.counters.add("chunk_duplicate")
            return
        expected = manifest.chunk_length(index)
        if len(payload) != expected:
            self.store.discard_staging(manifest)
            self._fail(model, manifest, "chunk_size_mismatch",
                       f"chunk {index} has {len(payload)} bytes, manifest says {expected}")
            return
        try:
            self.store.store_chunk(manifest, index, payload)
        except OSError as exc:
            self._storage_failed(model, manifest, exc)
            return
        download.missing.discard(index)
        download.received += 1
        download.stored.append(index)
        self._advance_hash(download, index, payload)
        clock = time.monotonic()
        progress = clock - download.progress_at >= PROGRESS_INTERVAL_S
        if not download.missing or progress or len(download.stored) >= UNSUBSCRIBE_BATCH:
            self._unsubscribe_stored(model, download)
        if download.missing and progress:
            download.progress_at = clock
            self._status(model, DeploymentState.DOWNLOADING, manifest=manifest,
                         received=manifest.chunk_count - len(download.missing))
        if not download.missing:
            self._finish(model, download)

    def _advance_hash(self, download: Download, index: int | None = None,
                      payload: bytes | None = None) -> None:
        """Feed the digest every chunk now contiguous from the start.

        The one just received comes from memory; the ones after it that came earlier
        are read back from the download file.
        """
        manifest = download.manifest
        if payload is not None and index == download.hashed:
            download.digest.update(payload)
            download.hashed += 1
        while download.hashed < manifest.chunk_count and download.hashed not in download.missing:
            download.digest.update(self.store.read_chunk(manifest, download.hashed))
            download.hashed += 1

    # -- verify, load, smoke test, switch ----------------------------------------

    def _finish(self, model: str, download: Download) -> None:
        manifest = download.manifest
        self.downloads.pop(model, None)
        self._status(model, DeploymentState.VERIFYING, manifest=manifest,
                     received=manifest.chunk_count)
        assembled = self._verified(model, download)
        if assembled is None:
            return
        self._status(model, DeploymentState.INSTALLING, manifest=manifest,
                     received=manifest.chunk_count)
        self._install(model, manifest, assembled)

    def _verified(self, model: str, download: Download) -> Path | None:
        """The downloaded file, synced and checked against the manifest; None if not."""
        manifest = download.manifest
        try:
            self._advance_hash(download)
            assembled = self.store.complete_download(manifest)
        except OSError as exc:
            self._storage_failed(model, manifest, exc)
            return None
        size = assembled.stat().st_size
        if size != manifest.size_bytes:
            self.store.discard_staging(manifest)
            self._fail(model, manifest, "size_mismatch",
                       f"{size} bytes, manifest says {manifest.size_bytes}")
            return None
        digest = download.digest.hexdigest()
        if digest != manifest.sha256 and download.resumed:
            # a chunk kept from a previous run was torn (power loss): fetch it all again
            self.store.discard_staging(manifest)
            self.counters.add("download_restarted")
            logger.warning("%s: %s %s: sha256 mismatch after resuming a download; "
                           "downloading it again", self.device_id, model, manifest.version)
            self._begin_download(model, manifest)
            return None
        if digest != manifest.sha256:
            self.store.discard_staging(manifest)
            self._fail(model, manifest, "sha256_mismatch",
                       f"sha256 {digest[:16]}..., manifest says {manifest.sha256[:16]}...")
            return None
        return assembled

    def _install(self, model: str, manifest: ReleaseManifest, assembled: Path) -> None:
        """Load and smoke-test the verified file, place it in the free slot, switch."""
        try:
            runtime, memory = self._load(str(assembled), manifest.format)
        except (ModelLoadError, RuntimeUnavailableError) as exc:
            self.store.discard_staging(manifest)
            self._fail(model, manifest, "load_failed", str(exc))
            return
        problem = smoke_test(runtime, manifest.input_shape)
        if problem is not None:
            runtime.close()
            self.store.discard_staging(manifest)
            self._fail(model, manifest, "smoke_test_failed", problem)
            return
        slot = self.store.target_slot(model)
        try:
            path = self.store.place(assembled, model, slot, manifest.format)
            installed = InstalledModel(manifest.version, manifest.format, manifest.sha256,
                                       manifest.size_bytes, slot, str(path))
            self.store.commit(model, installed)  # the commit point: before it, nothing changed
        except OSError as exc:
            runtime.close()
            self._storage_failed(model, manifest, exc)
            return
        self.inference.activate(model, installed, runtime, memory)
        self.store.discard_staging(manifest)
        if self.store.previous(model) is not None:  # a first install has nothing to return to
            self.probation[model] = (time.monotonic(), manifest.version)
        logger.info("%s: %s %s installed in slot %s", self.device_id, model, manifest.version,
                    slot)
        self._status(model, DeploymentState.INSTALLED, manifest=manifest,
                     received=manifest.chunk_count)

    # -- rollback ---------------------------------------------------------------

    def _rollback(self, model: str, reason: str) -> DeploymentStatus:
        current = self.store.active(model)
        previous = self.store.previous(model)
        if previous is None:
            raise InstallError("no_previous", f"{model} has no previous version to return to")
        runtime, memory = self._load(previous.path, previous.format)
        self.store.rollback(model)
        self.inference.activate(model, previous, runtime, memory)
        self.probation.pop(model, None)
        if current is not None:
            self._failed.add((model, current.version, current.sha256))
        self.counters.add("rollbacks")
        logger.warning("%s: %s rolled back to %s: %s", self.device_id, model, previous.version,
                       reason)
        return self._status(model, DeploymentState.ROLLED_BACK, error=reason[:1024])

    # -- benchmark (downloaded like a release, timed, never activated) ------------

    def submit_benchmark(self, manifest: ReleaseManifest, options: dict[str, int],
                         reply: BenchReply) -> None:
        """Fetch, verify and time a signed release on this device; ``reply`` when done."""
        self._jobs.put(lambda: self._start_benchmark(manifest, options, reply))

    def _start_benchmark(self, manifest: ReleaseManifest, options: dict[str, int],
                         reply: BenchReply) -> None:
        try:
            verify_manifest(manifest, self.keys)
        except InstallError as exc:
            self.counters.add(f"benchmark_{exc.reason}")
            reply(None, f"{exc.reason}: {exc.detail}")
            return
        problems = compatibility_problems(manifest, self.caps)
        if problems:
            reply(None, "incompatible: " + "; ".join(problems))
            return
        key = (manifest.model, manifest.version)
        old = self.benchmarks.pop(key, None)
        if old is not None:
            old.reply(None, "replaced by a newer benchmark of the same version")
        bench = BenchDownload(manifest, options, reply)
        self.benchmarks[key] = bench
        self._chunks(bench.topics(self.topics), True)

    def _end_benchmark(self, bench: BenchDownload) -> None:
        self.benchmarks.pop((bench.manifest.model, bench.manifest.version), None)
        if self.downloads.get(bench.manifest.model) is None \
                or self.downloads[bench.manifest.model].manifest.version \
                != bench.manifest.version:  # a release download of it keeps its topics
            self._chunks(bench.topics(self.topics), False)

    def _bench_chunk(self, bench: BenchDownload, index: int, payload: bytes) -> None:
        manifest = bench.manifest
        if index >= manifest.chunk_count or index in bench.chunks:
            return
        if len(payload) != manifest.chunk_length(index):
            self._end_benchmark(bench)
            bench.reply(None, f"chunk_size_mismatch: chunk {index} has {len(payload)} bytes, "
                        f"manifest says {manifest.chunk_length(index)}")
            return
        bench.chunks[index] = payload
        if len(bench.chunks) == manifest.chunk_count:
            self._end_benchmark(bench)
            self._run_benchmark(bench)

    def _run_benchmark(self, bench: BenchDownload) -> None:
        from edge_node.benchmark import BenchmarkError, run_benchmark

        manifest = bench.manifest
        data = b"".join(bench.chunks[i] for i in range(manifest.chunk_count))
        bench.chunks.clear()
        if len(data) != manifest.size_bytes:
            bench.reply(None, f"size_mismatch: {len(data)} bytes, manifest says "
                        f"{manifest.size_bytes}")
            return
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            bench.reply(None, "sha256_mismatch: the chunks do not make the signed file")
            return
        threads = bench.options.get("threads", 1)
        folder = self.store.root / "benchmark"
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / f"model.{EXTENSIONS[manifest.format]}"
            path.write_bytes(data)
            try:
                result = run_benchmark(
                    path, manifest.format, runs=bench.options.get("runs", 1000),
                    warmup=bench.options.get("warmup", 50), threads=threads,
                    batch=bench.options.get("batch", 1),
                    loader=lambda p, f: load_runtime(p, f, threads=threads))
            except (BenchmarkError, ModelLoadError, RuntimeUnavailableError) as exc:
                bench.reply(None, f"benchmark_failed: {exc}")
                return
        figures: dict[str, JsonValue] = {k: v for k, v in result.as_json().items()
                                         if k != "path"}
        bench.reply({"model": manifest.model, "version": manifest.version, **figures}, None)

    def _sweep_benchmarks(self) -> None:
        for bench in list(self.benchmarks.values()):
            if time.monotonic() - bench.started > BENCH_TIMEOUT_S:
                self._end_benchmark(bench)
                bench.reply(None, f"the chunks of {bench.manifest.model} "
                            f"{bench.manifest.version} did not all arrive within "
                            f"{BENCH_TIMEOUT_S:.0f} s ({len(bench.chunks)} of "
                            f"{bench.manifest.chunk_count})")

    def _check_probation(self) -> None:
        self._sweep_benchmarks()
        self._unsubscribe_all_stored()  # a download that went quiet
        for model, (started, version) in list(self.probation.items()):
            age = time.monotonic() - started
            if age > self.settings.probation_s:
                del self.probation[model]
                continue
            stats = self.inference.stats(model, window_s=max(age, 1e-3))
            if stats is None or stats.samples < self.settings.probation_min_samples:
                continue
            if stats.error_rate_percent > self.settings.max_error_rate_percent:
                self._rollback(model, f"error rate {stats.error_rate_percent:.1f}% > "
                               f"{self.settings.max_error_rate_percent:.1f}% within "
                               f"{age:.0f} s of installing {version}")


def smoke_test(runtime: InferenceRuntime, input_shape: list[int] | None = None) -> str | None:
    """Run one zero input through a freshly loaded model; the problem, or None.

    The input shape comes from the model's signature, or from the manifest's
    ``input_shape`` when the file declares none (TorchScript without a signature).
    """
    if not runtime.inputs:
        return "model declares no input"
    spec = runtime.inputs[0]
    dims: tuple[int | None, ...] | list[int] | None = spec.shape if spec.known else input_shape
    if not dims:
        return "the model declares no input shape and the manifest gives no input_shape"
    shape = tuple(1 if d is None or d < 0 else d for d in dims)
    dtype = np.dtype(spec.dtype) if spec.known else np.dtype(np.float32)
    try:
        out = runtime.run(np.zeros(shape, dtype=dtype))
    except EdgeError as exc:
        return str(exc)
    if not np.all(np.isfinite(np.asarray(out, dtype=np.float64))):
        return "output is not finite"
    return None
