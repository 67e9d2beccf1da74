"""Benchmark one model file in its runtime: latency percentiles, throughput, memory.

The input batch is generated once, before the timed region, from the model's
declared input (shape, dtype; seeded values in [0, 1)); each timed call is
measured with ``time.perf_counter_ns``; warm-up calls are not timed. Peak
resident memory is the process's high-water mark (``getrusage``) and the
model's share is the resident-set growth across loading and running it.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from schemas.base import ModelFormat
from schemas.device import device_class as class_of

MiB = 1024 * 1024


class BenchmarkError(Exception):
    """The model cannot be benchmarked as asked; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    """What one benchmark measured."""

    path: str
    format: str
    runtime: str
    threads: int
    batch: int
    runs: int
    warmup: int
    latency_ms_mean: float
    latency_ms_std: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    throughput_per_s: float
    peak_rss_mb: float
    model_memory_mb: float
    device_class: str

    def metrics(self) -> dict[str, float]:
        """The figures the registry keeps (``benchmark`` source)."""
        return {"latency_ms_mean": self.latency_ms_mean, "latency_ms_std": self.latency_ms_std,
                "latency_ms_p50": self.latency_ms_p50, "latency_ms_p95": self.latency_ms_p95,
                "latency_ms_p99": self.latency_ms_p99,
                "throughput_per_s": self.throughput_per_s, "peak_memory_mb": self.peak_rss_mb,
                "model_memory_mb": self.model_memory_mb}

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        return (f"{self.path} ({self.format} on {self.runtime}, {self.threads} thread(s), "
                f"batch {self.batch}, {self.runs} runs after {self.warmup} warm-up)\n"
                f"latency ms: mean {self.latency_ms_mean:.4f} ± {self.latency_ms_std:.4f}, "
                f"p50 {self.latency_ms_p50:.4f}, p95 {self.latency_ms_p95:.4f}, "
                f"p99 {self.latency_ms_p99:.4f}\n"
                f"throughput: {self.throughput_per_s:.1f} examples/s; memory: peak RSS "
                f"{self.peak_rss_mb:.1f} MiB, model {self.model_memory_mb:.1f} MiB")


def device_class() -> str:
    """This machine, as the registry groups benchmark figures: ``arch/Ncpu``."""
    return class_of(platform.machine(), psutil.cpu_count(logical=True))


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * resource.getpagesize() / MiB


def _batch(spec: Any, batch: int, seed: int) -> np.ndarray:
    """The input batch from the model's declared input."""
    if not spec.known:
        raise BenchmarkError("the model declares no input signature: nothing to feed it")
    dims = list(spec.shape)
    if not dims:
        raise BenchmarkError("the model's input is a scalar")
    shape = [batch, *(1 if d is None else d for d in dims[1:])]
    rng = np.random.default_rng(seed)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float64).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise BenchmarkError(f"input dtype {dtype} is not supported by the benchmark")


def run_benchmark(path: Path, fmt: ModelFormat, *, runs: int, warmup: int, threads: int,
                  batch: int, loader: Callable[[Path, ModelFormat], Any],
                  tick: Callable[[int], None] | None = None, seed: int = 0) -> BenchmarkResult:
    """Load ``path`` with ``loader`` (the edge runtimes) and time ``runs`` calls.

    Raises:
        BenchmarkError: no input signature, or an input type the benchmark cannot make.
    """
    step = tick or (lambda _n: None)
    before = _rss_mb()
    runtime = loader(path, fmt)
    try:
        inputs = _batch(runtime.inputs[0], batch, seed)
        for _ in range(warmup):
            runtime.run(inputs)
        step(warmup)
        times = [0.0] * runs
        every = max(1, runs // 100)
        started = time.perf_counter_ns()
        for i in range(runs):
            start = time.perf_counter_ns()
            runtime.run(inputs)
            times[i] = (time.perf_counter_ns() - start) / 1e6
            if (i + 1) % every == 0:
                step(every)
        total_s = (time.perf_counter_ns() - started) / 1e9
        after = _rss_mb()
    finally:
        runtime.close()
    cuts = statistics.quantiles(times, n=100, method="inclusive") if runs > 1 else [times[0]] * 99
    return BenchmarkResult(
        path=str(path), format=fmt.value, runtime=str(runtime.runtime.value),
        threads=threads, batch=batch, runs=runs, warmup=warmup,
        latency_ms_mean=statistics.fmean(times),
        latency_ms_std=statistics.pstdev(times) if runs > 1 else 0.0,
        latency_ms_p50=cuts[49], latency_ms_p95=cuts[94], latency_ms_p99=cuts[98],
        throughput_per_s=runs * batch / total_s if total_s > 0 else 0.0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        model_memory_mb=max(0.0, after - before), device_class=device_class())
