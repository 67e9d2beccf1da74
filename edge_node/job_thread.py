"""A thread that runs jobs from a queue, one at a time.

The OTA installer and the FL client each own one, so the MQTT network thread only
ever enqueues.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from edge_node.counters import Counters

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class JobThread:
    """Runs queued jobs in order; a failing job is logged and counted, the thread goes on.

    Args:
        name: thread name.
        prefix: prefix of the failure counters (``{prefix}_{reason}``).
        counters: the agent's counters.
        survivable: the exception types a job may raise without stopping the thread.
    """

    def __init__(self, name: str, prefix: str, counters: Counters,
                 survivable: tuple[type[BaseException], ...]) -> None:
        self.name = name
        self.prefix = prefix
        self.counters = counters
        self.survivable = survivable
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        """Queue a job (from any thread)."""
        self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current job and end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except self.survivable as exc:
                # The one dispatcher of this thread: log, count, keep serving.
                self.counters.add(f"{self.prefix}_{getattr(exc, 'reason', type(exc).__name__)}")
                logger.exception("%s: job failed", self.name)
