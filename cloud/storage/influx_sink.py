"""TelemetrySink for InfluxDB 2 (or anything speaking ``/api/v2/write``, e.g. VictoriaMetrics).

Messages become line-protocol strings (:mod:`cloud.storage.line_protocol`) held in a
bounded in-memory buffer; :meth:`InfluxSink.flush` sends them in batches with
influxdb-client's synchronous write API. A batch the server does not take is retried
with exponential backoff and jitter, then kept for the next flush; when the buffer is
full the oldest lines are dropped and counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Annotated, Final, Literal, Self, cast

import urllib3.exceptions
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cloud.storage import line_protocol as lp
from cloud.storage.sink import AlertEvent, RolloutEvent, SinkStats
from schemas.alerts import CloudHealth
from schemas.device import DeploymentStatus, DeviceTelemetry, ModelMetrics
from schemas.fl import TaskStatus

logger = logging.getLogger(__name__)

_REJECTED_STATUS: Final = frozenset({400, 422})
"""Malformed or conflicting data: the same batch would be refused again, so it is dropped."""
DROP_LOG_INTERVAL_S: Final = 10.0
"""At most one "buffer full" warning per this many seconds."""


class InfluxSettings(BaseModel):
    """Where and how the sink writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="Base URL, e.g. `http://127.0.0.1:8086`")
    token: SecretStr
    org: str
    bucket: str
    batch_size: Annotated[int, Field(ge=1)] = 5000
    max_buffer_points: Annotated[int, Field(ge=1)] = Field(
        default=200_000, description="Lines kept while the server is unreachable; "
        "beyond it the oldest are dropped")
    retries: Annotated[int, Field(ge=0)] = Field(
        default=5, description="Extra attempts per batch within one flush")
    retry_base_s: Annotated[float, Field(ge=0)] = 0.5
    retry_max_s: Annotated[float, Field(ge=0)] = 30.0
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    precision: lp.Precision = "ms"


def error_reason(exc: BaseException) -> str:
    """A short, low-cardinality name for a failed write (the key in ``SinkStats.errors``)."""
    if isinstance(exc, ApiException):
        return f"http_{exc.status}" if exc.status else "api_error"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before timeouts: a subclass
        return "connection"
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, urllib3.exceptions.ProtocolError | ConnectionError):
        return "connection"
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return "http_client"
    return "os_error"


def _retry_after(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` in seconds (429/503 from InfluxDB), when given."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


class InfluxSink:
    """Buffered, batched writer of edgefl's measurements through influxdb-client.

    Thread-safe: ``write_*`` only append to the buffer and may run while another
    thread flushes. Flushes are serialized. The URL is fixed per instance.

    Args:
        settings: server, credentials, batching and retry settings.
        sleep: waits between retries (tests pass a short real sleep).
        rng: source of the backoff jitter.
    """

    def __init__(self, settings: InfluxSettings, *,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._precision: lp.Precision = settings.precision
        # WritePrecision's constants are the plain strings "s", "ms", "us", "ns"
        self._write_precision = cast(WritePrecision, settings.precision)
        self._client = InfluxDBClient(
            url=settings.url, token=settings.token.get_secret_value(), org=settings.org,
            timeout=int(settings.timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._buffer: deque[str] = deque(maxlen=settings.max_buffer_points)
        self._lock = threading.Lock()  # buffer and counters
        self._flush_lock = threading.Lock()  # one flush at a time
        self._in_flight = 0
        self._written = self._retried = self._failed_batches = 0
        self._dropped = self._skipped = 0
        self._errors: dict[str, int] = {}
        self._last_flush_failed = False
        self._dropped_seen = 0
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        self._closed = False

    # -- TelemetrySink ---------------------------------------------------------------

    def write_telemetry(self, batch: Sequence[DeviceTelemetry], *,
                        sites: dict[str, str] | None = None) -> None:
        """Buffer device telemetry (``sites``: device_id -> site label)."""
        sites = sites or {}
        self._append(lp.telemetry_line(m, sites.get(m.device_id), self._precision)
                     for m in batch)

    def write_model_metrics(self, batch: Sequence[ModelMetrics], *,
                            sites: dict[str, str] | None = None) -> None:
        """Buffer model metrics."""
        sites = sites or {}
        self._append(lp.model_metrics_line(m, sites.get(m.device_id), self._precision)
                     for m in batch)

    def write_deployment_status(self, batch: Sequence[DeploymentStatus]) -> None:
        """Buffer deployment status changes (a status without fields is skipped)."""
        self._append(lp.deployment_status_line(s, self._precision) for s in batch)

    def write_alert_events(self, batch: Sequence[AlertEvent]) -> None:
        """Buffer alert transitions."""
        self._append(lp.alert_event_line(e, self._precision) for e in batch)

    def write_fl_round(self, status: TaskStatus) -> None:
        """Buffer one federated round's record."""
        self._append([lp.fl_round_line(status, self._precision)])

    def write_rollout_event(self, event: RolloutEvent) -> None:
        """Buffer one step of a model rollout."""
        self._append([lp.rollout_event_line(event, self._precision)])

    def write_cloud_health(self, health: CloudHealth) -> None:
        """Buffer the service's own counters."""
        self._append(lp.cloud_health_lines(health, self._precision))

    def flush(self) -> None:
        """Send what is buffered now, in batches of ``batch_size``.

        Lines appended during the flush wait for the next one. A batch that still
        fails after ``retries`` retries goes back to the head of the buffer and the
        flush stops there (the server is unreachable: the next flush tries again); a
        batch the server refuses as malformed (400, 422) is dropped and counted.
        Never raises for server or network errors: see :meth:`stats` and :meth:`healthy`.
        """
        with self._flush_lock:
            with self._lock:
                budget = len(self._buffer)
            while budget > 0:
                with self._lock:
                    count = min(self.settings.batch_size, budget, len(self._buffer))
                    if count == 0:
                        break
                    batch = [self._buffer.popleft() for _ in range(count)]
                    self._in_flight = count
                budget -= count
                try:
                    outcome = self._send(batch)
                except BaseException:  # not a send error (a bug, KeyboardInterrupt): keep
                    with self._lock:
                        self._in_flight = 0
                        self._requeue(batch)
                    raise
                with self._lock:
                    self._in_flight = 0
                    if outcome == "written":
                        self._written += count
                    elif outcome == "rejected":
                        self._failed_batches += 1
                        self._dropped += count
                    else:
                        self._failed_batches += 1
                        self._last_flush_failed = True
                        self._requeue(batch)
                        return
            with self._lock:
                self._last_flush_failed = False

    def stats(self) -> SinkStats:
        """Counters since start; ``buffered`` includes a batch being sent."""
        with self._lock:
            return SinkStats(
                written=self._written, retried=self._retried,
                failed_batches=self._failed_batches, dropped=self._dropped,
                buffered=len(self._buffer) + self._in_flight, errors=dict(self._errors),
            )

    def close(self) -> None:
        """Flush (with its retries), then close the HTTP client; unsent lines are logged, lost."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            left = self.stats().buffered
            if left:
                logger.warning("influx sink closed with %d unsent line(s)", left)
            self._client.close()  # type: ignore[no-untyped-call]

    # -- extras ----------------------------------------------------------------------

    def healthy(self) -> bool:
        """False while the last flush failed, or when lines were dropped since the last call."""
        with self._lock:
            dropped_since = self._dropped != self._dropped_seen
            self._dropped_seen = self._dropped
            return not (self._last_flush_failed or dropped_since)

    def pending_lines(self) -> list[str]:
        """A copy of the buffered lines, oldest first (a batch being sent is not included)."""
        with self._lock:
            return list(self._buffer)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Buffer lines already in line protocol at this sink's precision.

        E.g. :meth:`pending_lines` of a sink being replaced by one with another URL.
        """
        self._append(lines)

    @property
    def skipped(self) -> int:
        """Messages not written because they had no field value."""
        return self._skipped

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _append(self, lines: Iterable[str | None]) -> None:
        if self._closed:
            raise RuntimeError("the influx sink is closed")
        produced = list(lines)
        kept = [line for line in produced if line is not None]
        with self._lock:
            self._skipped += len(produced) - len(kept)
            dropped = max(0, len(self._buffer) + len(kept) - self.settings.max_buffer_points)
            self._buffer.extend(kept)  # a deque with maxlen drops from the left: the oldest
        if dropped:
            self._count_dropped(dropped)

    def _requeue(self, batch: list[str]) -> None:
        """Put a failed batch back at the head; called with the lock held.

        The batch is older than anything buffered, so when there is not room for all
        of it, its own oldest lines are the ones dropped.
        """
        room = self.settings.max_buffer_points - len(self._buffer)
        kept = batch[-room:] if room > 0 else []
        self._buffer.extendleft(reversed(kept))
        lost = len(batch) - len(kept)
        if lost:
            self._dropped += lost
            logger.warning("influx buffer full: dropped %d line(s) of a failed batch", lost)

    def _count_dropped(self, count: int) -> None:
        with self._lock:
            self._dropped += count
            total = self._dropped
            now = time.monotonic()
            log = now - self._last_drop_log >= DROP_LOG_INTERVAL_S
            if log:
                self._last_drop_log = now
        if log:
            logger.warning("influx buffer full (%d lines): dropped the oldest, %d so far",
                           self.settings.max_buffer_points, total)

    def _send(self, batch: list[str]) -> Literal["written", "rejected", "failed"]:
        """Write one batch, retrying transient failures; never raises for them."""
        settings = self.settings
        attempt = 0
        while True:
            try:
                self._write_api.write(settings.bucket, settings.org, record=batch,
                                      write_precision=self._write_precision)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
                reason = error_reason(exc)
                with self._lock:
                    self._errors[reason] = self._errors.get(reason, 0) + 1
                if isinstance(exc, ApiException) and exc.status in _REJECTED_STATUS:
                    logger.error(  # noqa: TRY400 - the server's answer says it all
                        "influx refused a batch of %d line(s) (%s): %s; dropped",
                        len(batch), reason, exc.body)
                    return "rejected"
                if attempt >= settings.retries:
                    logger.warning("influx write of %d line(s) failed after %d attempt(s) "
                                   "(%s); kept for the next flush", len(batch), attempt + 1,
                                   reason)
                    return "failed"
                delay = self._backoff(attempt, exc)
                with self._lock:
                    self._retried += 1
                logger.info("influx write failed (%s: %s); retry %d/%d in %.2f s", reason,
                            exc, attempt + 1, settings.retries, delay)
                self._sleep(delay)
                attempt += 1
            else:
                return "written"

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        """Exponential backoff with jitter in [50 %, 100 %], at least the Retry-After."""
        settings = self.settings
        delay = min(settings.retry_max_s, settings.retry_base_s * 2.0 ** attempt)
        delay *= self._rng.uniform(0.5, 1.0)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, settings.retry_max_s))
        return delay
