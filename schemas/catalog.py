"""What travels on each topic kind: payload, QoS, retain flag, who sends it.

This is the machine-readable form of DESIGN.md's topic table. Publishers take
QoS and retain from here, the AsyncAPI export documents it, and tests check
that every topic kind has an entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel

from schemas.alerts import Alert, CloudHealth, CloudState
from schemas.device import (
    Command,
    CommandResult,
    DeploymentStatus,
    DeviceState,
    DeviceTelemetry,
    ModelMetrics,
)
from schemas.errors import TopicError
from schemas.fl import EvalResult, GlobalModelEnvelope, RoundPlan, TaskStatus, UpdateEnvelope
from schemas.release import ReleaseManifest
from schemas.secagg import SecAggInbox
from schemas.topics import TopicKind, Topics

SAFETENSORS: Final = "application/vnd.safetensors"
OCTET_STREAM: Final = "application/octet-stream"
JSON: Final = "application/json"
CLEARED_BY_CLOUD: Final = ("never retained by design: the cloud refuses retained data here and "
                           "clears it")


@dataclass(frozen=True, slots=True)
class Channel:
    """One row of the topic table.

    Attributes:
        kind: the topic kind.
        sender: who publishes on it.
        qos: MQTT QoS used for publishing.
        retain: whether messages are retained.
        content_type: MIME type of the payload.
        message: the JSON message model, or for safetensors payloads the
            envelope model carried in the header; ``None`` for raw bytes or a
            payload that is defined by a later protocol stage.
        summary: one line for humans.
    """

    kind: TopicKind
    sender: Literal["device", "cloud", "both"]
    qos: Literal[0, 1, 2]
    retain: bool
    content_type: str
    message: type[BaseModel] | None
    summary: str
    cleared: str | None = None
    """When an empty retained message clears the topic (None: never by design)."""
    note: str | None = None
    """What else a consumer must know (ordering against other channels)."""


CHANNELS: Final[dict[TopicKind, Channel]] = {
    c.kind: c
    for c in (
        Channel(TopicKind.DEVICE_STATE, "device", 1, True, JSON, DeviceState,
                "Birth (online) and death (offline, the LWT) of a device, with bdSeq"),
        Channel(TopicKind.TELEMETRY, "device", 1, False, JSON, DeviceTelemetry,
                "Periodic device health measured with psutil",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.MODEL_METRICS, "device", 1, False, JSON, ModelMetrics,
                "Latency percentiles, throughput, memory and errors of a deployed model",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.DEPLOYMENT_STATUS, "device", 1, True, JSON, DeploymentStatus,
                "Install state of a model on a device"),
        Channel(TopicKind.COMMAND, "cloud", 1, False, JSON, Command,
                "A command to one device"),
        Channel(TopicKind.COMMAND_REPLY, "device", 1, False, JSON, CommandResult,
                "A device's answer to a command, with the same correlation id",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.ROUND_PLAN, "cloud", 1, True, JSON, RoundPlan,
                "The current federated round: selected devices, version, deadline",
                cleared="when the task finishes or fails"),
        Channel(TopicKind.GLOBAL_MODEL, "cloud", 1, True, SAFETENSORS, GlobalModelEnvelope,
                "Global weights as safetensors; the header carries the envelope",
                cleared="once a newer version is released (only the current one stays)"),
        Channel(TopicKind.UPDATE, "device", 1, False, SAFETENSORS, UpdateEnvelope,
                "A device's model-update delta as safetensors; the header carries the envelope",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.EVAL, "device", 1, False, JSON, EvalResult,
                "A device's federated evaluation of the global model",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.SECAGG_BROADCAST, "cloud", 1, False, OCTET_STREAM, None,
                "Secure aggregation: cloud to the round's devices (keys, shares, unmask requests)"),
        Channel(TopicKind.SECAGG_DEVICE, "device", 1, False, OCTET_STREAM, None,
                "Secure aggregation: one device's keys, encrypted shares, masked input",
                cleared=CLEARED_BY_CLOUD),
        Channel(TopicKind.SECAGG_INBOX, "cloud", 1, False, JSON, SecAggInbox,
                "Secure aggregation: the shares the round's other devices encrypted for one "
                "device (its inbox: only that device may read it)"),
        Channel(TopicKind.TASK_STATUS, "cloud", 1, True, JSON, TaskStatus,
                "Progress and metrics of a federated task"),
        Channel(TopicKind.RELEASE, "cloud", 1, True, JSON, ReleaseManifest,
                "Signed release manifest of a model version; its chunks are published first",
                cleared="when the release is retired, or a rollout is aborted with no earlier "
                "release to restore",
                note="Chunks before the manifest: every chunk the manifest lists is published "
                "retained (QoS 1, acknowledged) on `models/{model}/versions/{version}/chunks/"
                "{chunk}` before the manifest itself, so a device that receives the manifest "
                "finds all of its chunks retained."),
        Channel(TopicKind.CHUNK, "cloud", 1, True, OCTET_STREAM, None,
                "Raw bytes of one chunk of a released model file",
                cleared="when the version is no longer released (retired or replaced), and "
                "after a fleet benchmark of a version that is not released",
                note="Published before the release manifest that lists it (see the release "
                "channel); a manifest never names a chunk that is not yet retained."),
        Channel(TopicKind.CLOUD_STATE, "cloud", 1, True, JSON, CloudState,
                "Cloud online/offline (LWT), like Sparkplug's primary-host STATE"),
        Channel(TopicKind.CLOUD_HEALTH, "cloud", 1, True, JSON, CloudHealth,
                "What one cloud instance accepted, stored and refused (by topic kind and "
                "reason), rate-limited and failed, and its queue depths; every few seconds"),
        Channel(TopicKind.ALERT, "cloud", 1, True, JSON, Alert,
                "An active alert; cleared by an empty retained message when resolved",
                cleared="when the alert resolves"),
    )
}

JSON_MESSAGES: Final[tuple[type[BaseModel], ...]] = tuple(
    dict.fromkeys(
        c.message for c in CHANNELS.values() if c.message is not None
    )
)
"""Every model that travels as JSON or as a safetensors envelope, in table order."""


def content_type(topics: Topics, topic: str) -> str | None:
    """The MIME type a publisher sets (MQTT 5 content type) on ``topic``; None if unknown."""
    try:
        return CHANNELS[topics.parse(topic).kind].content_type
    except TopicError:
        return None
