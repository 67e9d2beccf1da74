"""Counters shared by the agent's threads (network, agent, OTA, FL, applications).

``collections.Counter`` is not safe to increment from several threads
(``c[k] += 1`` is a read and a write); here every change is one call under a
lock, and telemetry reads a consistent snapshot.
"""

from __future__ import annotations

import threading


class Counters:
    """Named non-negative counts, changed only through :meth:`add`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to ``name`` (from any thread)."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy of every count."""
        with self._lock:
            return dict(self._values)
