"""The topic namespace: builders, subscription filters and a parser.

Every topic of edgefl is described once, in :data:`TOPIC_TEMPLATES`, as a
template of fixed levels and ``{placeholder}`` levels under a configurable
root (default ``edgefl/v1``). The same table builds publish topics (with every
id validated), subscription filters (unset placeholders become ``+``) and the
parser (one regular expression with named groups per kind, built from the
template), so the three can never disagree.

Example:
    >>> t = Topics()
    >>> t.telemetry("pi-07")
    'edgefl/v1/devices/pi-07/telemetry'
    >>> t.parse("edgefl/v1/devices/pi-07/telemetry").device_id
    'pi-07'
    >>> t.filter(TopicKind.TELEMETRY)
    'edgefl/v1/devices/+/telemetry'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.errors import InvalidIdError, InvalidTopicError, UnknownTopicError

DEFAULT_ROOT: Final = "edgefl/v1"

ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
"""Device ids, model names, task names, rule names, command names, stages."""
VERSION_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""Model and global-weight versions (``1.4.0``, ``7``); never ``.`` or ``..``."""
INDEX_PATTERN: Final = r"0|[1-9][0-9]{0,8}"
"""Round numbers and chunk indexes: non-negative decimal without leading zeros."""

_ID_RE: Final = re.compile(rf"\A(?:{ID_PATTERN})\Z")
_VERSION_RE: Final = re.compile(rf"\A(?:{VERSION_PATTERN})\Z")
_INDEX_RE: Final = re.compile(rf"\A(?:{INDEX_PATTERN})\Z")
_ROOT_LEVEL_RE: Final = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
MAX_TOPIC_BYTES: Final = 65535


class TopicKind(StrEnum):
    """Every kind of topic in the DESIGN topic table."""

    DEVICE_STATE = "device_state"
    TELEMETRY = "telemetry"
    MODEL_METRICS = "model_metrics"
    DEPLOYMENT_STATUS = "deployment_status"
    COMMAND = "command"
    COMMAND_REPLY = "command_reply"
    ROUND_PLAN = "round_plan"
    GLOBAL_MODEL = "global_model"
    UPDATE = "update"
    EVAL = "eval"
    SECAGG_BROADCAST = "secagg_broadcast"
    SECAGG_DEVICE = "secagg_device"
    SECAGG_INBOX = "secagg_inbox"
    TASK_STATUS = "task_status"
    RELEASE = "release"
    CHUNK = "chunk"
    CLOUD_STATE = "cloud_state"
    CLOUD_HEALTH = "cloud_health"
    ALERT = "alert"


TOPIC_TEMPLATES: Final[dict[TopicKind, str]] = {
    TopicKind.DEVICE_STATE: "devices/{device_id}/state",
    TopicKind.TELEMETRY: "devices/{device_id}/telemetry",
    TopicKind.MODEL_METRICS: "devices/{device_id}/models/{model}/metrics",
    TopicKind.DEPLOYMENT_STATUS: "devices/{device_id}/models/{model}/status",
    TopicKind.COMMAND: "devices/{device_id}/cmd/{command}",
    TopicKind.COMMAND_REPLY: "devices/{device_id}/cmd/{command}/reply",
    TopicKind.ROUND_PLAN: "fl/{task}/round",
    TopicKind.GLOBAL_MODEL: "fl/{task}/global/{version}",
    TopicKind.UPDATE: "fl/{task}/rounds/{round}/updates/{device_id}",
    TopicKind.EVAL: "fl/{task}/rounds/{round}/evals/{device_id}",
    TopicKind.SECAGG_BROADCAST: "fl/{task}/rounds/{round}/secagg/{stage}",
    TopicKind.SECAGG_DEVICE: "fl/{task}/rounds/{round}/secagg/{stage}/{device_id}",
    TopicKind.SECAGG_INBOX: "fl/{task}/rounds/{round}/secagg/{stage}/to/{device_id}",
    TopicKind.TASK_STATUS: "fl/{task}/status",
    TopicKind.RELEASE: "models/{model}/release",
    TopicKind.CHUNK: "models/{model}/versions/{version}/chunks/{chunk}",
    TopicKind.CLOUD_STATE: "cloud/state",
    TopicKind.CLOUD_HEALTH: "cloud/health/{instance}",
    TopicKind.ALERT: "alerts/{device_id}/{rule}",
}
"""The topic table, relative to the root. The single source of every topic string."""

_PLACEHOLDER_PATTERNS: Final[dict[str, str]] = {
    "device_id": ID_PATTERN,
    "model": ID_PATTERN,
    "task": ID_PATTERN,
    "command": ID_PATTERN,
    "rule": ID_PATTERN,
    "stage": ID_PATTERN,
    "instance": ID_PATTERN,
    "version": VERSION_PATTERN,
    "round": INDEX_PATTERN,
    "chunk": INDEX_PATTERN,
}
_PLACEHOLDER_RE: Final = re.compile(r"\{(\w+)\}")


def validate_id(value: object, kind: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidIdError(kind, value, ID_PATTERN)
    return value


def validate_version(value: object) -> str:
    """Return ``value`` if it is a valid version string, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise InvalidIdError("version", value, VERSION_PATTERN)
    return value


def _validate_level(name: str, value: object) -> str:
    if name in ("round", "chunk"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InvalidIdError(name, value, INDEX_PATTERN)
        text = str(value)
        if not _INDEX_RE.match(text):
            raise InvalidIdError(name, value, INDEX_PATTERN)
        return text
    if name == "version":
        return validate_version(value)
    return validate_id(value, name)


def validate_publish_topic(topic: str) -> str:
    """Check a topic is publishable: no wildcards, no empty level, bounded length."""
    if not topic:
        raise InvalidTopicError(topic, "empty")
    if "+" in topic or "#" in topic:
        raise InvalidTopicError(topic, "wildcards '+'/'#' are not allowed in a publish topic")
    if "\x00" in topic:
        raise InvalidTopicError(topic, "NUL character")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise InvalidTopicError(topic, f"longer than {MAX_TOPIC_BYTES} bytes")
    return topic


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A received topic resolved to its kind and the ids it carries."""

    kind: TopicKind
    device_id: str | None = None
    model: str | None = None
    task: str | None = None
    command: str | None = None
    rule: str | None = None
    stage: str | None = None
    instance: str | None = None
    version: str | None = None
    round: int | None = None
    chunk: int | None = None


class Topics:
    """Builders, filters and parser for one topic root.

    Args:
        root: topic prefix, one or more levels of ``[A-Za-z0-9_.-]``; a test
            or a tenant gets its own root.
    """

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        levels = root.split("/")
        if not all(_ROOT_LEVEL_RE.match(level) for level in levels):
            raise InvalidTopicError(root, "root levels must match [A-Za-z0-9_.-]{1,64}")
        self.root = root
        escaped = re.escape(root)
        self._parsers: list[tuple[TopicKind, re.Pattern[str]]] = []
        for kind, template in TOPIC_TEMPLATES.items():
            body = _PLACEHOLDER_RE.sub(
                lambda m: f"(?P<{m.group(1)}>{_PLACEHOLDER_PATTERNS[m.group(1)]})",
                re.escape(template).replace(r"\{", "{").replace(r"\}", "}"),
            )
            self._parsers.append((kind, re.compile(rf"\A{escaped}/{body}\Z")))

    def __repr__(self) -> str:
        return f"Topics(root={self.root!r})"

    # -- generic -------------------------------------------------------------

    def build(self, kind: TopicKind, **ids: str | int) -> str:
        """Build the publish topic of ``kind`` from its ids, validating each."""
        template = TOPIC_TEMPLATES[kind]
        names = _PLACEHOLDER_RE.findall(template)
        if set(ids) != set(names):
            raise TypeError(f"{kind} needs ids {names}, got {sorted(ids)}")
        levels = {name: _validate_level(name, ids[name]) for name in names}
        return validate_publish_topic(f"{self.root}/{template.format(**levels)}")

    def filter(self, kind: TopicKind, **ids: str | int) -> str:
        """Subscription filter for ``kind``: given ids fixed, every other one ``+``."""
        template = TOPIC_TEMPLATES[kind]
        names = _PLACEHOLDER_RE.findall(template)
        unknown = set(ids) - set(names)
        if unknown:
            raise TypeError(f"{kind} has no ids {sorted(unknown)}")
        levels = {
            name: (_validate_level(name, ids[name]) if name in ids else "+") for name in names
        }
        return f"{self.root}/{template.format(**levels)}"

    def all(self) -> str:
        """Filter matching every topic under the root."""
        return f"{self.root}/#"

    def parse(self, topic: str) -> ParsedTopic:
        """Resolve a received topic to its kind and ids.

        Raises:
            UnknownTopicError: the topic is not one of the documented kinds
                under this root, or one of its ids is invalid.
        """
        for kind, pattern in self._parsers:
            match = pattern.match(topic)
            if match is None:
                continue
            groups: dict[str, str | int] = dict(match.groupdict())
            for key in ("round", "chunk"):
                if key in groups:
                    groups[key] = int(groups[key])
            return ParsedTopic(kind, **groups)  # type: ignore[arg-type]
        raise UnknownTopicError(topic, self.root)

    # -- devices -------------------------------------------------------------

    def device_state(self, device_id: str) -> str:
        """``devices/{d}/state``: retained birth/death (LWT) of a device."""
        return self.build(TopicKind.DEVICE_STATE, device_id=device_id)

    def telemetry(self, device_id: str) -> str:
        """``devices/{d}/telemetry``: periodic DeviceTelemetry."""
        return self.build(TopicKind.TELEMETRY, device_id=device_id)

    def model_metrics(self, device_id: str, model: str) -> str:
        """``devices/{d}/models/{m}/metrics``: ModelMetrics of a deployed model."""
        return self.build(TopicKind.MODEL_METRICS, device_id=device_id, model=model)

    def deployment_status(self, device_id: str, model: str) -> str:
        """``devices/{d}/models/{m}/status``: retained DeploymentStatus."""
        return self.build(TopicKind.DEPLOYMENT_STATUS, device_id=device_id, model=model)

    def command(self, device_id: str, command: str) -> str:
        """``devices/{d}/cmd/{name}``: a Command to a device."""
        return self.build(TopicKind.COMMAND, device_id=device_id, command=command)

    def command_reply(self, device_id: str, command: str) -> str:
        """``devices/{d}/cmd/{name}/reply``: the CommandResult."""
        return self.build(TopicKind.COMMAND_REPLY, device_id=device_id, command=command)

    # -- federated learning --------------------------------------------------

    def round_plan(self, task: str) -> str:
        """``fl/{t}/round``: retained RoundPlan."""
        return self.build(TopicKind.ROUND_PLAN, task=task)

    def global_model(self, task: str, version: str) -> str:
        """``fl/{t}/global/{version}``: retained safetensors global weights."""
        return self.build(TopicKind.GLOBAL_MODEL, task=task, version=version)

    def update(self, task: str, round_: int, device_id: str) -> str:
        """``fl/{t}/rounds/{r}/updates/{d}``: safetensors model-update delta."""
        return self.build(TopicKind.UPDATE, task=task, round=round_, device_id=device_id)

    def eval_result(self, task: str, round_: int, device_id: str) -> str:
        """``fl/{t}/rounds/{r}/evals/{d}``: EvalResult."""
        return self.build(TopicKind.EVAL, task=task, round=round_, device_id=device_id)

    def secagg_broadcast(self, task: str, round_: int, stage: str) -> str:
        """``fl/{t}/rounds/{r}/secagg/{stage}``: cloud to selected devices."""
        return self.build(TopicKind.SECAGG_BROADCAST, task=task, round=round_, stage=stage)

    def secagg_inbox(self, task: str, round_: int, stage: str, device_id: str) -> str:
        """``fl/{t}/rounds/{r}/secagg/{stage}/to/{d}``: cloud to one device (only it reads)."""
        return self.build(
            TopicKind.SECAGG_INBOX, task=task, round=round_, stage=stage, device_id=device_id
        )

    def secagg_device(self, task: str, round_: int, stage: str, device_id: str) -> str:
        """``fl/{t}/rounds/{r}/secagg/{stage}/{d}``: one device's secure-aggregation input."""
        return self.build(
            TopicKind.SECAGG_DEVICE, task=task, round=round_, stage=stage, device_id=device_id
        )

    def task_status(self, task: str) -> str:
        """``fl/{t}/status``: retained TaskStatus."""
        return self.build(TopicKind.TASK_STATUS, task=task)

    # -- models, cloud, alerts -----------------------------------------------

    def release(self, model: str) -> str:
        """``models/{m}/release``: retained ReleaseManifest."""
        return self.build(TopicKind.RELEASE, model=model)

    def chunk(self, model: str, version: str, index: int) -> str:
        """``models/{m}/versions/{v}/chunks/{i}``: retained raw bytes of chunk i."""
        return self.build(TopicKind.CHUNK, model=model, version=version, chunk=index)

    def cloud_state(self) -> str:
        """``cloud/state``: retained online/offline of the cloud (LWT)."""
        return self.build(TopicKind.CLOUD_STATE)

    def cloud_health(self, instance: str) -> str:
        """``cloud/health/{instance}``: retained CloudHealth counters of one instance."""
        return self.build(TopicKind.CLOUD_HEALTH, instance=instance)

    def alert(self, device_id: str, rule: str) -> str:
        """``alerts/{d}/{rule}``: retained Alert while active, empty when cleared."""
        return self.build(TopicKind.ALERT, device_id=device_id, rule=rule)


def shared_filter(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription ``$share/{group}/{filter}`` for load-split ingest."""
    validate_id(group, "shared group")
    return f"$share/{group}/{topic_filter}"
