"""Pytest plugin: a real VictoriaMetrics (it speaks InfluxDB's ``/api/v2/write``).

VictoriaMetrics stores a line-protocol point as one series per field, named
``<measurement>_<field>``, with the tags as labels; org and bucket are ignored and
string fields are stored as 0. :meth:`VictoriaMetrics.export` reads series back.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import free_port, terminate

logger = logging.getLogger(__name__)

BINARY_NAME = "victoria-metrics"
INSTALL_HINT = "install victoria-metrics: apt-get install victoria-metrics (make test does it)"
START_TIMEOUT_S = 15.0
Series = dict[str, Any]
"""One exported series: ``{"metric": {labels}, "values": [...], "timestamps": [ms...]}``."""


def find_victoria_metrics() -> Path | None:
    """The victoria-metrics binary on PATH or in /usr/bin, if installed."""
    found = shutil.which(BINARY_NAME) or shutil.which(f"/usr/bin/{BINARY_NAME}")
    return Path(found) if found else None


def _quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class VictoriaMetrics:
    """A running VictoriaMetrics child process."""

    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_file: Path
    binary: Path
    port: int

    def _get(self, path: str, params: dict[str, str] | None = None) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:  # noqa: S310
            body: bytes = resp.read()
            return body

    def force_flush(self) -> None:
        """Make recently written points searchable now (instead of within seconds)."""
        self._get("/internal/force_flush")

    def export(self, metric_regex: str, **labels: str) -> list[Series]:
        """Every series whose name matches ``metric_regex`` (and ``labels``), as stored now."""
        selector = ",".join([f"__name__=~{_quote(metric_regex)}",
                             *(f"{key}={_quote(value)}" for key, value in labels.items())])
        body = self._get("/api/v1/export", {"match[]": "{" + selector + "}"})
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_export(self, metric_regex: str, *, points: int, timeout: float = 15.0,
                    **labels: str) -> list[Series]:
        """Poll (bounded) until the matching series hold at least ``points`` points.

        A series created a moment ago becomes searchable after a flush of the storage;
        this forces one on every poll.

        Raises:
            TimeoutError: fewer points than expected within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while True:
            self.force_flush()
            series = self.export(metric_regex, **labels)
            found = sum(len(s["timestamps"]) for s in series)
            if found >= points:
                return series
            if time.monotonic() > deadline:
                raise TimeoutError(f"{found} of {points} points of {metric_regex} {labels} "
                                   f"within {timeout} s")
            tick.wait(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the server's own ``/metrics`` samples named ``name`` with these labels.

        The server refreshes these values about once a second: compare them on a
        fresh server (:func:`own_victoria`) or poll.
        """
        total = 0.0
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        for line in self._get("/metrics").decode().splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{", 1)[0] == name and all(w in series for w in wanted):
                total += float(value)
        return total

    def healthy(self) -> bool:
        """Whether ``/health`` answers OK."""
        try:
            return self._get("/health").strip() == b"OK"
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the server's log, for error messages."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def restart(self) -> None:
        """Stop, then start again on the same port with the same storage."""
        self.stop()
        self.process = start_victoria_metrics(self.binary, self.data_dir, self.port).process

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        terminate(self.process, "victoria-metrics", timeout)


def start_victoria_metrics(binary: Path, data_dir: Path, port: int | None = None,
                           timeout: float = START_TIMEOUT_S) -> VictoriaMetrics:
    """Start VictoriaMetrics on 127.0.0.1 (a free port by default); wait for ``/health``.

    Raises:
        TimeoutError: not healthy within ``timeout`` (the process is stopped).
        RuntimeError: the process exited.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "victoria-metrics.log"
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [str(binary), f"-httpListenAddr=127.0.0.1:{port}",
             f"-storageDataPath={data_dir / 'storage'}", "-retentionPeriod=100y",
             "-search.latencyOffset=0s", "-search.disableCache"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    vm = VictoriaMetrics(f"http://127.0.0.1:{port}", proc, data_dir, log_file, binary, port)
    deadline = time.monotonic() + timeout
    while not vm.healthy():
        try:
            code = proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                vm.stop()
                raise TimeoutError(f"victoria-metrics not healthy after {timeout} s:\n"
                                   f"{vm.log_tail()}") from None
            continue
        raise RuntimeError(f"victoria-metrics exited with code {code}:\n{vm.log_tail()}")
    logger.info("victoria-metrics pid %s at %s", proc.pid, vm.url)
    return vm


def _binary() -> Path:
    binary = find_victoria_metrics()
    if binary is None:
        pytest.fail(INSTALL_HINT)
    return binary


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """A real VictoriaMetrics for the test session; tests use their own tag values."""
    vm = start_victoria_metrics(_binary(), tmp_path_factory.mktemp("victoria"))
    try:
        yield vm
    finally:
        vm.stop()


@pytest.fixture
def own_victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A VictoriaMetrics of this test's own, which it may stop and restart (~0.5 s)."""
    vm = start_victoria_metrics(_binary(), tmp_path / "victoria")
    try:
        yield vm
    finally:
        vm.stop()


@pytest.fixture
def unique_id() -> Callable[[str], str]:
    """Makes ids (device, task, ...) no other test uses: ``unique_id("dev")``."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:12]}"
