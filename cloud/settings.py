"""CloudSettings: everything the cloud service is configured with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cloud.fl.config import FLTaskConfig
from cloud.rate_limit import RateLimitSettings
from cloud.storage.influx_sink import InfluxSettings
from schemas.base import Id
from schemas.client_settings import MqttClientSettings, SettingsSection
from schemas.settings_files import FileSettings
from schemas.topics import DEFAULT_ROOT


class CloudMqttSettings(MqttClientSettings):
    """The cloud's MQTT session."""

    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=1884, description="The broker's service listener (devices use another)")
    username: str = "edgefl-cloud"
    client_id: str | None = Field(default=None, description="Defaults to edgefl-cloud-{instance}")
    session_expiry_s: Annotated[int, Field(ge=0)] = 86_400
    shared_group: Id | None = Field(
        default=None, description="Split telemetry/metrics ingest with other instances "
        "through $share/{group}/... (MQTT 5)")
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=4096, description="MQTT 5 Receive Maximum: messages the broker may hand over "
        "before the service acknowledged them (acknowledged after commit)")
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0


class IngestSettings(SettingsSection):
    """What the boundary accepts."""

    max_payload_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    max_future_skew_s: Annotated[float, Field(ge=0)] = 300.0
    require_registration: bool = Field(
        default=False, description="Refuse devices that are not in `provisioned`")
    provisioned: list[Id] = Field(default_factory=list)
    batch_max: Annotated[int, Field(ge=1)] = 1000
    flush_interval_s: Annotated[float, Field(gt=0)] = 0.2
    request_report_on_gap: bool = True
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)


class AlertSettings(SettingsSection):
    """The alert engine."""

    rules_file: Path | None = Field(default=None, description="YAML rules; default: packaged")
    tick_interval_s: Annotated[float, Field(gt=0)] = 5.0


class ModelOpsSettings(SettingsSection):
    """The model registry and releases."""

    artifacts_dir: Path | None = Field(
        default=None, description="Model files by content; default: {data_dir}/artifacts")
    release_key: Path | None = Field(
        default=None, description="Ed25519 release key (PEM, owner-only); default: "
        "{data_dir}/keys/release.pem, created by `edgefl model keygen`")
    key_id: Id = Field(default="release-1", description="The name devices know the key by")
    chunk_bytes: Annotated[int, Field(ge=1024, le=8 * 1024 * 1024)] = Field(
        default=256 * 1024, description="Bytes per retained model chunk (below the broker's "
        "max_packet_size and the devices' limits)")


class CloudSettings(FileSettings):
    """Settings of one cloud service instance (``EDGEFL_CLOUD_*`` variables, a file, options)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFL_CLOUD_", env_nested_delimiter="__", extra="forbid"
    )

    instance: Id = "cloud-1"
    topic_root: str = DEFAULT_ROOT
    data_dir: Path = Path("var/cloud")
    mqtt: CloudMqttSettings = Field(default_factory=CloudMqttSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    fl: dict[Id, FLTaskConfig] = Field(
        default_factory=dict, description="Federated tasks this instance coordinates")
    health_interval_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="How often the service publishes and stores its counters")
    stop_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=4.0, description="Longest graceful stop; what is not acknowledged by then is "
        "delivered again by the broker")
    influx: InfluxSettings | None = Field(
        default=None, description="Also write telemetry to InfluxDB (for Grafana)")
    models: ModelOpsSettings = Field(default_factory=ModelOpsSettings)

    @property
    def sqlite_path(self) -> Path:
        """The embedded store."""
        return self.data_dir / "edgefl.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        """Where the registry keeps model files."""
        return self.models.artifacts_dir or self.data_dir / "artifacts"

    @property
    def release_key_path(self) -> Path:
        """The release signing key."""
        return self.models.release_key or self.data_dir / "keys" / "release.pem"

    @property
    def client_id(self) -> str:
        """MQTT client id of this instance."""
        return self.mqtt.client_id or f"edgefl-cloud-{self.instance}"
