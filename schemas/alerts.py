"""Alerts raised by the cloud's rule engine, and the cloud's own presence state."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.base import Id, NonNegInt, Severity, ShortText, UnixTime, Version, WireModel


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
    run: Id | None = Field(
        default=None, description="Random id of this process: two processes that share an "
        "instance name (and so a client id) tell each other apart by it")


Counts = dict[Id, NonNegInt]


class CloudHealth(WireModel):
    """Retained on ``cloud/health/{instance}``: what the instance did since it was set up.

    Counters survive restarts; each refusal is counted under the topic kind it
    arrived on and its reason (``validation``, ``too_large``, ``future_timestamp``,
    ``retained_not_allowed``, ``stale_round``, ...).
    """

    instance: Id
    ts: UnixTime
    started_at: UnixTime = Field(description="When this process started")
    connected: bool
    accepted: Counts = Field(default_factory=dict, max_length=64,
                             description="Messages accepted, by topic kind")
    stored: Counts = Field(default_factory=dict, max_length=64,
                           description="Rows stored, by topic kind")
    duplicates: Counts = Field(default_factory=dict, max_length=64,
                               description="Redeliveries and replays stored once, by kind")
    rate_limited: Counts = Field(default_factory=dict, max_length=64,
                                 description="Messages over their device's budget, by kind")
    refused: dict[Id, Counts] = Field(default_factory=dict, max_length=64,
                                      description="Refusals by topic kind, then reason")
    errors: Counts = Field(default_factory=dict, max_length=64,
                           description="Failures inside the service (dispatch, store, ...)")
    queues: Counts = Field(default_factory=dict, max_length=64,
                           description="Current depths: pending rows, acknowledgements, "
                           "alert outbox, coordinator inboxes")
