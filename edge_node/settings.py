"""EdgeSettings: everything an agent is configured with (``EDGEFL_EDGE_*``, a file, CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from edge_node.attacks import AttackSettings
from schemas.base import Id
from schemas.client_settings import MqttClientSettings, SettingsSection
from schemas.settings_files import FileSettings
from schemas.topics import DEFAULT_ROOT

MiB = 1024 * 1024


class MqttSettings(MqttClientSettings):
    """The agent's MQTT session."""

    username: str | None = Field(default=None, description="Defaults to the device id")
    session_expiry_s: Annotated[int, Field(ge=0)] = Field(
        default=3600, description="Persistent session kept by the broker while offline"
    )
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_packet_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=16 * MiB, description="Largest packet published when the broker advertises "
        "no maximum (MQTT 3.1.1); the project's broker config allows 16 MiB")


class TelemetrySettings(SettingsSection):
    """Telemetry cadence and the model-metrics window."""

    interval_s: Annotated[float, Field(ge=0.05, le=86_400)] = 10.0
    metrics_window_s: Annotated[float, Field(gt=0)] = 60.0
    latency_samples: Annotated[int, Field(ge=10)] = Field(
        default=2048, description="Inference latencies kept per model for percentiles"
    )


class BufferSettings(SettingsSection):
    """The on-disk store-and-forward queue used while the broker is unreachable."""

    max_messages: Annotated[int, Field(ge=1)] = 10_000
    max_bytes: Annotated[int, Field(ge=1024)] = 16 * MiB
    drain_rate_per_s: Annotated[float, Field(gt=0)] = Field(
        default=50.0, description="Pace of the replay after an outage (below the cloud's "
        "per-device budget)")
    durable: bool = Field(
        default=True, description="fsync every write (survives a power cut); off keeps "
        "messages across a crash of the agent but not of the OS (the fleet simulator)")



class OtaSettings(SettingsSection):
    """Model installs: who may sign releases, and when a new model is rolled back."""

    trusted_keys: dict[Id, str] = Field(
        default_factory=dict,
        description="key_id -> Ed25519 public key (base64 of the 32 raw bytes, or PEM)",
    )
    trusted_key_files: dict[Id, Path] = Field(
        default_factory=dict,
        description="key_id -> file holding the public key in either form (the release.pub "
        "that `edgefl model keygen` writes beside the release key)",
    )
    probation_s: Annotated[float, Field(ge=0)] = 300.0
    probation_min_samples: Annotated[int, Field(ge=1)] = 20
    max_error_rate_percent: Annotated[float, Field(ge=0, le=100)] = 5.0
    max_model_bytes: Annotated[int, Field(ge=1)] = 512 * MiB


class FLTaskSettings(SettingsSection):
    """One task this device takes part in."""

    path: str = Field(description="Import path of the task, `package.module:Class`")
    options: dict[str, Any] = Field(default_factory=dict, description="Task constructor "
                                    "arguments, e.g. {model: cnn}")
    partition: int = Field(default=0, ge=0, description="This device's partition index")
    partitions: int = Field(default=1, ge=1, description="Number of partitions")
    scheme: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    attack: AttackSettings | None = Field(
        default=None, description="Simulation only: this device poisons the task "
        "(edge_node/attacks.py), for tests and benchmarks of robust aggregation")


class SimulatedDevice(SettingsSection):
    """Simulation only (``edgefl fleet --profile``): how this device is slow or unreliable."""

    speed_factor: float = Field(default=1.0, ge=1, le=1000,
                                description="Training takes this many times as long")
    failure_rate: float = Field(default=0.0, ge=0, le=1,
                                description="Chance of dropping a round it was selected for")
    seed: int = 0


class SecAggSettings(SettingsSection):
    """Secure aggregation: the device's identity, from ``edgefl broker add-device``."""

    identity_key: Path = Field(description="The device's Ed25519 identity key (PEM), "
                               "secrets/identities/{device}.key in the broker's data folder")
    certificate: Path = Field(description="Its certificate, secrets/identities/{device}.json")
    authority_key: str = Field(
        min_length=44, max_length=44, description="The fleet's identity authority public key: "
        "the base64 in the broker's secrets/identity-authority.pub")


class FLSettings(SettingsSection):
    """Federated-learning tasks of the device."""

    tasks: dict[Id, FLTaskSettings] = Field(default_factory=dict)
    secagg: SecAggSettings | None = Field(
        default=None, description="Needed to take part in tasks that aggregate securely")
    simulation: SimulatedDevice | None = None
    max_weights_bytes: int = 64 * 1024 * 1024
    max_clock_skew_s: Annotated[float, Field(ge=0)] = Field(
        default=300.0, description="A round plan issued further in the future is logged as "
        "clock skew (the deadline check cannot be trusted then)")


class EdgeSettings(FileSettings):
    """Settings of one edge agent."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFL_EDGE_", env_nested_delimiter="__", extra="forbid"
    )

    device_id: Id
    topic_root: str = DEFAULT_ROOT
    state_dir: Path = Field(default=Path("var/edge"), description="Buffer, models, state")
    site: Id | None = None
    agent_threads: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="Threads per inference session"
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    ota: OtaSettings = Field(default_factory=OtaSettings)
    fl: FLSettings = Field(default_factory=FLSettings)

    @model_validator(mode="after")
    def _reconnect_bounds(self) -> EdgeSettings:
        if self.mqtt.reconnect_max_s < self.mqtt.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self

    @property
    def username(self) -> str:
        """MQTT username: the device id unless set."""
        return self.mqtt.username or self.device_id
