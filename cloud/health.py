"""What the service counts about its own work, by topic kind and reason.

Every message is accepted or refused (with a reason), duplicates and
rate-limited ones are counted apart, and so is whatever failed inside the
service. The counts are persisted with each committed batch (so they survive a
restart and match what was acknowledged), on the health interval when they
changed and at a stop, published retained on ``cloud/health/{instance}``,
written to the sinks and shown by ``edgefl cloud status``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from schemas.alerts import CloudHealth
from schemas.base import now

STATE_KEY = "cloud_health"

_Counts = dict[str, NonNegativeInt]


class SavedHealth(BaseModel):
    """The persisted counts (strict: a corrupt record is refused whole, never half-restored).

    An unknown key is refused too (a misspelt category would otherwise load as zero counts);
    the refusal is counted as ``health_restore_failed`` and the cloud starts from zero.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    accepted: _Counts = Field(default_factory=dict)
    duplicates: _Counts = Field(default_factory=dict)
    rate_limited: _Counts = Field(default_factory=dict)
    stored: _Counts = Field(default_factory=dict)
    refused: dict[str, _Counts] = Field(default_factory=dict)
    errors: _Counts = Field(default_factory=dict)


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

    def restore(self, saved: object) -> None:
        """Continue from the counts saved before a restart (``None``: nothing saved).

        Raises:
            pydantic.ValidationError: the record is not a snapshot of counts; nothing
                is restored then.
        """
        if saved is None:
            return
        counts = SavedHealth.model_validate(saved)
        self.accepted.update(counts.accepted)
        self.duplicates.update(counts.duplicates)
        self.rate_limited.update(counts.rate_limited)
        self.stored.update(counts.stored)
        for kind, reasons in counts.refused.items():
            self.refused[kind].update(reasons)
        self.errors.update(counts.errors)

    def message(self, *, instance: str, started_at: float, connected: bool,
                queues: dict[str, int]) -> CloudHealth:
        """The retained health message."""
        return CloudHealth.model_validate({
            "instance": instance, "ts": now(), "started_at": started_at,
            "connected": connected, **self.snapshot(), "queues": queues,
        })
