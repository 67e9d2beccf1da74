"""What the service counts about its own work, by topic kind and reason.

Every message is accepted or refused (with a reason), duplicates and
rate-limited ones are counted apart, and so is whatever failed inside the
service. The counts are persisted with each committed batch (so they survive a
restart and match what was acknowledged), published retained on
``cloud/health/{instance}``, written to the sinks and shown by
``edgefl cloud status``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from schemas.alerts import CloudHealth
from schemas.base import now

STATE_KEY = "cloud_health"


class HealthCounters:
    """Counters by category, topic kind and reason (and the flat legacy names)."""

    def __init__(self, flat: Counter[str]) -> None:
        self.flat = flat
        self.accepted: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.refused: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.errors: Counter[str] = Counter()

    # -- counting (event loop) ---------------------------------------------------------

    def accept(self, kind: str) -> None:
        """An accepted message of ``kind``."""
        self.accepted[kind] += 1
        self.flat[f"accepted_{kind}"] += 1

    def refuse(self, kind: str, reason: str, flat: str | None = None) -> None:
        """A refused message of ``kind``, with its reason (``flat``: the legacy name)."""
        self.refused[kind][reason] += 1
        self.flat[flat or f"refused_{reason}"] += 1

    def duplicate(self, kind: str, flat: str | None = None) -> None:
        """A message of ``kind`` already stored or counted (it counts once)."""
        self.duplicates[kind] += 1
        self.flat[flat or f"duplicate_{kind}"] += 1

    def limit(self, kind: str) -> None:
        """A message of ``kind`` over its device's budget."""
        self.rate_limited[kind] += 1
        self.flat["rate_limited"] += 1

    def store(self, kind: str, count: int) -> None:
        """``count`` rows of ``kind`` committed."""
        if count:
            self.stored[kind] += count

    def error(self, name: str) -> None:
        """A failure inside the service, by name."""
        self.errors[name] += 1
        self.flat[name] += 1

    # -- persistence ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready counts (taken on the loop with a batch, stored in its transaction)."""
        return {"accepted": dict(self.accepted), "duplicates": dict(self.duplicates),
                "rate_limited": dict(self.rate_limited), "stored": dict(self.stored),
                "refused": {k: dict(v) for k, v in self.refused.items() if v},
                "errors": dict(self.errors)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from the counts saved before a restart."""
        self.accepted.update(saved.get("accepted", {}))
        self.duplicates.update(saved.get("duplicates", {}))
        self.rate_limited.update(saved.get("rate_limited", {}))
        self.stored.update(saved.get("stored", {}))
        for kind, reasons in saved.get("refused", {}).items():
            self.refused[kind].update(reasons)
        self.errors.update(saved.get("errors", {}))

    def message(self, *, instance: str, started_at: float, connected: bool,
                queues: dict[str, int]) -> CloudHealth:
        """The retained health message."""
        return CloudHealth.model_validate({
            "instance": instance, "ts": now(), "started_at": started_at,
            "connected": connected, **self.snapshot(), "queues": queues,
        })
