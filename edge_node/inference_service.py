"""Local inference for on-device applications, measuring what it does.

Each active model keeps a sliding window of its real inferences (end time,
latency, thread CPU time, success) from which :meth:`InferenceService.metrics`
computes latency percentiles, throughput, CPU use and error rate. Prediction
and error counts since the previous telemetry message feed DeviceTelemetry.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter

import numpy as np
import psutil

from edge_node.errors import InferenceError
from edge_node.inference import InferenceRuntime
from edge_node.model_store import InstalledModel

logger = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What one model did over the metrics window."""

    samples: int
    errors: int
    latency_ms_mean: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    throughput_per_s: float
    cpu_percent: float | None
    error_rate_percent: float
    accuracy: float | None


BUCKET_S = 1.0
"""Width of the per-second buckets that count every call (throughput, CPU, errors)."""


@dataclass(slots=True)
class _Bucket:
    """Every call that ended within one second: counts and busy time."""

    second: int
    calls: int = 0
    errors: int = 0
    busy_s: float = 0.0


@dataclass
class ActiveModel:
    """A loaded model and its measurements.

    Throughput, CPU and error rate count every call (per-second buckets over the
    window); latency percentiles come from a bounded sample of the most recent
    calls, so a model serving 200k calls/s is reported as such.
    """

    name: str
    installed: InstalledModel
    runtime: InferenceRuntime
    memory_mb: float | None
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (perf_counter at the end, latency s, ok); perf_counter is monotonic
    calls: deque[tuple[float, float, bool]] = field(default_factory=deque)
    buckets: deque[_Bucket] = field(default_factory=deque)
    feedback: deque[tuple[float, int, int]] = field(default_factory=deque)
    predictions: int = 0
    errors: int = 0
    interval_calls: int = 0
    interval_errors: int = 0
    closed: bool = False

    def record(self, end: float, latency: float, ok: bool, rows: int) -> None:
        """Note one call (under ``lock``)."""
        self.calls.append((end, latency, ok))
        second = int(end // BUCKET_S)
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(_Bucket(second))
        bucket = self.buckets[-1]
        bucket.calls += 1
        bucket.busy_s += latency
        self.predictions += rows
        self.interval_calls += 1
        if not ok:
            bucket.errors += 1
            self.errors += rows
            self.interval_errors += 1


def rss_bytes() -> int:
    """Resident memory of this process."""
    return int(psutil.Process().memory_info().rss)


class InferenceService:
    """The models serving on this device, by name."""

    def __init__(self, *, max_samples: int = 2048, window_s: float = 60.0) -> None:
        self.max_samples = max_samples
        self.window_s = window_s
        self._models: dict[str, ActiveModel] = {}
        self._lock = threading.Lock()
        self._orphan_errors = 0

    def activate(self, name: str, installed: InstalledModel, runtime: InferenceRuntime,
                 memory_mb: float | None) -> None:
        """Serve ``runtime`` as ``name`` from now on; the previous one is closed.

        The old runtime is closed under its lock, so a call running on it ends
        first; a call that picked the old model just before the switch runs on the
        new one instead.
        """
        model = ActiveModel(name, installed, runtime, memory_mb, perf_counter(),
                            calls=deque(maxlen=self.max_samples))
        with self._lock:
            old = self._models.get(name)
            self._models[name] = model
        if old is not None:
            self._close(old)

    def deactivate(self, name: str) -> None:
        """Stop serving ``name``."""
        with self._lock:
            old = self._models.pop(name, None)
        if old is not None:
            self._close(old)

    @staticmethod
    def _close(model: ActiveModel) -> None:
        with model.lock:
            model.closed = True
            model.runtime.close()

    def get(self, name: str) -> ActiveModel | None:
        """The active model called ``name``."""
        return self._models.get(name)

    def names(self) -> list[str]:
        """Names of the models serving."""
        return list(self._models)

    def infer(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Run one batch; counts predictions and errors, records latency.

        Raises:
            InferenceError: unknown model, bad input or runtime failure.
        """
        rows = batch.shape[0] if batch.ndim else 1
        while True:
            model = self._models.get(name)
            if model is None:
                with self._lock:
                    self._orphan_errors += 1
                raise InferenceError(f"no model {name!r} is active")
            with model.lock:
                if model.closed:  # switched (OTA, rollback) since we looked it up
                    continue
                start = perf_counter()
                try:
                    out = model.runtime.run(batch)
                except InferenceError:
                    end = perf_counter()
                    model.record(end, end - start, False, rows)
                    raise
                end = perf_counter()
                model.record(end, end - start, True, rows)
            return out

    def record_feedback(self, name: str, correct: int, total: int) -> None:
        """Labelled feedback from the application, for the accuracy metric."""
        model = self._models.get(name)
        if model is None or total <= 0 or not 0 <= correct <= total:
            raise InferenceError(f"bad feedback for {name!r}: {correct}/{total}")
        with model.lock:
            model.feedback.append((perf_counter(), correct, total))

    def take_counts(self) -> tuple[int, int]:
        """Predictions and errors (rows) since the previous call (for DeviceTelemetry)."""
        predictions = errors = 0
        for model in list(self._models.values()):
            with model.lock:
                predictions += model.predictions
                errors += model.errors
                model.predictions = model.errors = 0
        with self._lock:
            errors += self._orphan_errors
            self._orphan_errors = 0
        return predictions, errors

    def take_interval(self, name: str) -> tuple[int, int]:
        """Calls and failed calls of ``name`` since the previous call (for ModelMetrics).

        Unlike the overlapping sliding windows, these add up over time.
        """
        model = self._models.get(name)
        if model is None:
            return 0, 0
        with model.lock:
            counts = model.interval_calls, model.interval_errors
            model.interval_calls = model.interval_errors = 0
        return counts

    def stats(self, name: str, window_s: float | None = None) -> WindowStats | None:
        """Window statistics of ``name`` (None if not active)."""
        model = self._models.get(name)
        if model is None:
            return None
        window = window_s or self.window_s
        now = perf_counter()
        since = now - window
        first_second = int(since // BUCKET_S)
        with model.lock:
            while model.buckets and model.buckets[0].second < first_second - 1:
                model.buckets.popleft()
            buckets = [b for b in model.buckets if b.second >= first_second]
            calls = [c for c in model.calls if c[0] >= since]
            feedback = [f for f in model.feedback if f[0] >= since]
            while model.feedback and model.feedback[0][0] < since:
                model.feedback.popleft()
        span = max(1e-9, min(window, now - model.loaded_at))
        total = sum(b.calls for b in buckets)
        errors = sum(b.errors for b in buckets)
        busy = sum(b.busy_s for b in buckets)
        if calls:
            latencies = np.fromiter((c[1] for c in calls), dtype=np.float64) * 1000.0
            p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
            mean = float(latencies.mean())
            # Inference runs synchronously on the caller's thread (one intra-op thread):
            # its busy time is its CPU time.
            cpu: float | None = 100.0 * busy / span
        else:
            p50 = p95 = p99 = mean = cpu = None  # type: ignore[assignment]
        total_fb = sum(f[2] for f in feedback)
        return WindowStats(
            samples=total,
            errors=errors,
            latency_ms_mean=mean,
            latency_ms_p50=None if p50 is None else float(p50),
            latency_ms_p95=None if p95 is None else float(p95),
            latency_ms_p99=None if p99 is None else float(p99),
            throughput_per_s=total / span,
            cpu_percent=cpu,
            error_rate_percent=100.0 * errors / total if total else 0.0,
            accuracy=sum(f[1] for f in feedback) / total_fb if total_fb else None,
        )

    def close(self) -> None:
        """Close every runtime."""
        for name in list(self._models):
            self.deactivate(name)
