"""Alerts raised by the cloud's rule engine, and the cloud's own presence state."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.base import Id, Severity, ShortText, UnixTime, Version, WireModel


class Alert(WireModel):
    """Retained on ``alerts/{d}/{rule}`` while the alert is active.

    When the alert resolves, the cloud clears the topic with an empty retained
    message; the history (with ``resolved_at``) is kept in the cloud's store.
    """

    device_id: Id
    rule: Id
    severity: Severity
    state: Literal["firing", "acknowledged"] = "firing"
    metric: Annotated[str, Field(max_length=128)] = Field(
        description="Field the rule watches, e.g. `telemetry.cpu_percent`"
    )
    value: float | None = Field(default=None, description="Value that opened the alert")
    threshold: float | None = Field(default=None, description="Threshold of the rule")
    model: Id | None = Field(default=None, description="Model, for model-metric rules")
    version: Version | None = None
    message: ShortText
    opened_at: UnixTime
    ts: UnixTime
    acknowledged_by: Id | None = None


class CloudState(WireModel):
    """Retained on ``cloud/state`` (LWT sets offline), like Sparkplug's primary-host STATE."""

    state: Literal["online", "offline"]
    instance: Id = Field(description="Cloud instance name")
    ts: UnixTime
