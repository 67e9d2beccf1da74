"""Messages a device publishes about itself, and the commands it answers."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, computed_field, model_validator

from schemas.base import (
    INT64_MAX,
    Fraction,
    Id,
    ModelFormat,
    NonNegFloat,
    NonNegInt,
    Percent,
    RuntimeName,
    ShortText,
    UnixTime,
    Version,
    WireModel,
)

SessionId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Random id of one agent process run; with `seq` it keys a message for "
        "de-duplication across reconnects and offline-buffer replays",
    ),
]
Seq = Annotated[
    int,
    Field(
        ge=0,
        le=INT64_MAX,
        description="Per-session sequence number, +1 per message of this kind (as Sparkplug's "
        "seq) so that a consumer detects gaps",
    ),
]


class HardwareInfo(WireModel):
    """What a device declares about its hardware in its birth message."""

    platform: Annotated[str, Field(max_length=64, description="OS, e.g. `Linux`")]
    machine: Annotated[str, Field(max_length=64, description="CPU architecture, e.g. `aarch64`")]
    cpu_count: Annotated[int, Field(ge=1, le=4096, description="Logical CPUs")]
    memory_total_mb: Annotated[float, Field(gt=0, description="Physical memory, MiB")]
    disk_total_mb: NonNegFloat | None = Field(default=None, description="Data disk size, MiB")
    gpu: bool = Field(default=False, description="A GPU or NPU usable for inference is present")
    accelerators: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=16, description="Names of accelerators, if any"
    )

    def device_class(self) -> str:
        """How benchmark figures and release preferences group devices."""
        return device_class(self.machine, self.cpu_count)


def device_class(machine: str | None, cpu_count: int | None) -> str:
    """``machine/Ncpu``, for example ``aarch64/4cpu``."""
    return f"{machine or 'unknown'}/{cpu_count or 0}cpu"


class DeviceState(WireModel):
    """Birth (``online``) and death (``offline``, usually the LWT) of a device.

    ``bd_seq`` is Sparkplug's bdSeq: the birth and the will registered for the
    same connection carry the same number, so a consumer can tell a stale
    death (from an earlier connection) from the current one.
    """

    device_id: Id
    state: Literal["online", "offline"]
    bd_seq: Annotated[int, Field(ge=0, le=INT64_MAX,
                                 description="Birth/death sequence of the connection")]
    ts: UnixTime
    agent_version: Annotated[str, Field(max_length=64)] | None = None
    hardware: HardwareInfo | None = None
    memory_available_mb: NonNegFloat | None = Field(default=None, description="MiB")
    runtimes: dict[RuntimeName, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict, description="Installed inference runtimes and their versions"
    )
    model_formats: list[ModelFormat] = Field(
        default_factory=list, description="Model formats this device can load"
    )
    site: Id | None = Field(default=None, description="Site or group label (low cardinality)")
    fl_tasks: list[Id] = Field(
        default_factory=list, max_length=64,
        description="Federated tasks this device takes part in (only members are selected)",
    )
    reason: Literal["lwt", "shutdown", "birth"] | None = Field(
        default=None, description="Why this state was published: `lwt` is an ungraceful "
        "death (the broker sent the will), `shutdown` a clean stop",
    )

    @model_validator(mode="after")
    def _birth_is_complete(self) -> Self:
        if self.state == "online" and (self.hardware is None or self.agent_version is None):
            raise ValueError("an online (birth) state must declare hardware and agent_version")
        return self


class DeviceTelemetry(WireModel):
    """Periodic health of a device, measured with psutil.

    A value the hardware cannot measure (no temperature sensor, no battery) is
    ``null``, never a made-up number.
    """

    device_id: Id
    session_id: SessionId
    seq: Seq
    ts: UnixTime
    cpu_percent: Percent = Field(description="CPU utilisation over the interval, %")
    memory_percent: Percent = Field(description="Physical memory in use, %")
    disk_percent: Percent = Field(description="Data disk in use, %")
    temperature_c: Annotated[float, Field(ge=-90.0, le=200.0)] | None = Field(
        default=None, description="Hottest CPU/SoC sensor, degrees Celsius; null without sensor"
    )
    battery_percent: Percent | None = Field(
        default=None, description="Battery charge, %; null without battery"
    )
    battery_plugged: bool | None = Field(
        default=None, description="On external power; null without battery"
    )
    network_latency_ms: NonNegFloat | None = Field(
        default=None, description="MQTT round-trip to the broker, ms; null until measured"
    )
    prediction_count: NonNegInt = Field(
        default=0, description="Inferences since the previous telemetry message"
    )
    error_count: NonNegInt = Field(
        default=0, description="Failed inferences since the previous telemetry message"
    )
    uptime_s: NonNegFloat | None = Field(default=None, description="Seconds since boot")
    interval_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=10.0, description="Reporting interval in force, s"
    )
    historical: bool = Field(
        default=False,
        description="True when replayed from the offline buffer after a reconnect",
    )
    counters: dict[Id, NonNegInt] = Field(
        default_factory=dict,
        max_length=64,
        description="Agent counters since start (refused messages per reason, buffer "
        "evictions, ...)",
    )

    @computed_field(description="error_count / prediction_count, %; 0 without predictions")  # type: ignore[prop-decorator]
    @property
    def error_rate_percent(self) -> float:
        """Share of failed inferences in this interval, %."""
        if self.prediction_count == 0:
            return 0.0
        return min(100.0, 100.0 * self.error_count / self.prediction_count)


class ModelMetrics(WireModel):
    """Performance of one deployed model over a sliding window of real inferences."""

    device_id: Id
    model: Id
    version: Version
    runtime: RuntimeName
    session_id: SessionId
    seq: Seq
    ts: UnixTime
    window_s: Annotated[float, Field(gt=0)] = Field(description="Window length, s")
    sample_count: NonNegInt = Field(description="Inferences in the window")
    latency_ms_mean: NonNegFloat | None = Field(default=None, description="Mean latency, ms")
    latency_ms_p50: NonNegFloat | None = Field(default=None, description="Median latency, ms")
    latency_ms_p95: NonNegFloat | None = Field(default=None, description="95th percentile, ms")
    latency_ms_p99: NonNegFloat | None = Field(default=None, description="99th percentile, ms")
    throughput_per_s: NonNegFloat = Field(description="Inferences per second in the window")
    memory_mb: NonNegFloat | None = Field(
        default=None, description="Resident memory attributable to the model, MiB"
    )
    cpu_percent: NonNegFloat | None = Field(
        default=None,
        description="Share of one core busy in inference calls over the window, %",
    )
    error_count: NonNegInt = Field(default=0, description="Failed inferences in the window")
    error_rate_percent: Percent = Field(default=0.0, description="Failed / all inferences, %")
    accuracy: Fraction | None = Field(
        default=None, description="Accuracy on labelled feedback in the window, 0-1"
    )
    interval_count: NonNegInt = Field(
        default=0, description="Inference calls since the previous ModelMetrics of this "
        "session (unlike the overlapping windows, these add up over time)",
    )
    interval_errors: NonNegInt = Field(
        default=0, description="Failed calls since the previous ModelMetrics of this session"
    )
    historical: bool = Field(default=False, description="Replayed from the offline buffer")


class DeploymentState(StrEnum):
    """Where a model install stands on a device."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    INCOMPATIBLE = "incompatible"
    ROLLED_BACK = "rolled_back"


class DeploymentStatus(WireModel):
    """Retained status of one model on one device."""

    device_id: Id
    model: Id
    ts: UnixTime
    state: DeploymentState
    target_version: Version | None = Field(default=None, description="Version being installed")
    active_version: Version | None = Field(default=None, description="Version now serving")
    previous_version: Version | None = Field(default=None, description="Rollback target")
    slot: Literal["A", "B"] | None = Field(default=None, description="Active A/B slot")
    chunks_received: NonNegInt | None = None
    chunks_total: NonNegInt | None = None
    error: ShortText | None = Field(default=None, description="Why it failed or rolled back")
    reasons: list[ShortText] = Field(
        default_factory=list, max_length=32, description="Incompatibility reasons"
    )

    @model_validator(mode="after")
    def _failure_has_reason(self) -> Self:
        bad = (DeploymentState.FAILED, DeploymentState.ROLLED_BACK)
        if self.state in bad and not self.error:
            raise ValueError(f"state {self.state.value} needs an error")
        if self.state == DeploymentState.INCOMPATIBLE and not self.reasons:
            raise ValueError("state incompatible needs reasons")
        return self


CorrelationId = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Echoed in the CommandResult"),
]


class Command(WireModel):
    """A request to a device on ``devices/{d}/cmd/{name}``."""

    correlation_id: CorrelationId
    ts: UnixTime
    args: dict[Annotated[str, Field(max_length=64)], JsonValue] = Field(
        default_factory=dict, description="Command arguments"
    )
    expires_at: UnixTime | None = Field(
        default=None, description="Do not execute after this time"
    )


class CommandStatus(StrEnum):
    """Outcome of a command."""

    OK = "ok"
    ERROR = "error"


class CommandResult(WireModel):
    """The answer on ``devices/{d}/cmd/{name}/reply``."""

    correlation_id: CorrelationId
    device_id: Id
    command: Id
    ts: UnixTime
    status: CommandStatus
    result: dict[Annotated[str, Field(max_length=64)], JsonValue] = Field(default_factory=dict)
    error: ShortText | None = None

    @model_validator(mode="after")
    def _error_has_text(self) -> Self:
        if self.status == CommandStatus.ERROR and not self.error:
            raise ValueError("an error result needs an error message")
        return self


class CommandArgs(BaseModel):
    """Base of the arguments of one command (``Command.args``): strict, no unknown key."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PingArgs(CommandArgs):
    """``ping``: no arguments; answers with its clock, bd_seq and session."""


class ReportNowArgs(CommandArgs):
    """``report_now``: publish telemetry and model metrics at once."""

    missing: NonNegInt | None = Field(
        default=None, description="Telemetry messages the cloud found missing (a gap)")


class SetTelemetryIntervalArgs(CommandArgs):
    """``set_telemetry_interval``: change the reporting interval."""

    interval_s: Annotated[float, Field(ge=0.05, le=86_400, description="Seconds")]


class RollbackArgs(CommandArgs):
    """``rollback``: return a model to its previous A/B slot."""

    model: Id
    reason: ShortText | None = None


class InferArgs(CommandArgs):
    """``infer``: run the active model on a batch and answer with its outputs."""

    model: Id
    inputs: list[JsonValue] = Field(max_length=4096, description="A batch (nested lists)")


class BenchmarkArgs(CommandArgs):
    """``benchmark``: download a signed release (not activated) and time it on the device.

    ``manifest`` is a signed ``ReleaseManifest`` (as JSON); its chunks are retained
    on their topics while the benchmark runs. The device checks the signature, its
    compatibility, size and sha256 as for a release, loads the model in its runtime
    with ``threads`` threads and times ``runs`` calls on a batch of ``batch``
    (after ``warmup`` untimed calls); the result holds latency percentiles,
    throughput, memory and the device class.
    """

    manifest: dict[Annotated[str, Field(max_length=64)], JsonValue]
    runs: Annotated[int, Field(ge=1, le=100_000)] = 1000
    warmup: Annotated[int, Field(ge=0, le=10_000)] = 50
    threads: Annotated[int, Field(ge=1, le=64)] = 1
    batch: Annotated[int, Field(ge=1, le=4096)] = 1


COMMAND_ARGS: dict[str, type[CommandArgs]] = {
    "ping": PingArgs, "report_now": ReportNowArgs,
    "set_telemetry_interval": SetTelemetryIntervalArgs, "rollback": RollbackArgs,
    "infer": InferArgs, "benchmark": BenchmarkArgs,
}
"""The commands a device answers and the schema of each one's ``args``."""
