"""Broker settings and the on-disk layout of a broker's data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.client_settings import SettingsSection
from schemas.topics import DEFAULT_ROOT

MiB = 1024 * 1024
Port = Annotated[int, Field(ge=0, le=65535)]


class TlsListenerSettings(SettingsSection):
    """An optional TLS listener; with mTLS the certificate CN becomes the username."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8883
    service_port: Port = Field(
        default=8884, description="mTLS listener of the services (the cloud): only "
        "certificates of the services' own CA (pki/services) connect there, so no device "
        "certificate can reach it; each cloud instance keeps its own client id")
    require_certificate: bool = Field(
        default=True, description="mTLS: clients must present a certificate signed by the CA"
    )
    use_identity_as_username: bool = Field(
        default=True, description="The certificate CN is the MQTT username (the device id)"
    )
    tls_version: Literal["tlsv1.2", "tlsv1.3"] = "tlsv1.2"
    cafile: Path | None = Field(default=None, description="Defaults to the data folder's CA")
    certfile: Path | None = None
    keyfile: Path | None = None
    crlfile: Path | None = Field(
        default=None, description="Revoked client certificates; defaults to the data "
        "folder CA's crl.pem (kept by remove-device) when that CA is used")


class BrokerSettings(BaseSettings):
    """How the fleet's Mosquitto is configured (``EDGEFL_BROKER_*`` variables)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFL_BROKER_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(default=Path("var/broker"), description="Config, secrets, PKI, data")
    host: str = Field(default="127.0.0.1", description="Plain listener bind address")
    port: Port = Field(default=1883, description="Device listener (client id = username)")
    service_host: str = Field(default="127.0.0.1", description="Service listener address")
    observer_host: str = Field(default="127.0.0.1", description="Observer listener address")
    observer_port: Port = Field(
        default=1885, description="Observer listener: read-only identities (Telegraf, Node-RED)")
    service_port: Port = Field(
        default=1884, description="Service listener: the cloud and observers only (their own "
        "password file), so no device identity can take a service's client id")
    topic_root: str = Field(
        default=DEFAULT_ROOT,
        description="Topic root the ACL is written for; may contain `+` levels (tests)",
    )
    cloud_username: str = Field(default="edgefl-cloud", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    allow_anonymous: bool = False
    max_packet_size: Annotated[int, Field(ge=64 * 1024, le=256 * MiB)] = Field(
        default=16 * MiB,
        description="Largest MQTT packet; above a model chunk or a full update plus headers",
    )
    max_queued_messages: Annotated[int, Field(ge=0)] = Field(
        default=100_000,
        description="Per-client queue (default 1000 drops silently when the cloud lags)",
    )
    max_queued_bytes: Annotated[int, Field(ge=0)] = Field(default=512 * MiB)
    max_inflight_messages: Annotated[int, Field(ge=0, le=65535)] = 20
    persistence: bool = True
    autosave_interval_s: Annotated[int, Field(ge=1)] = 60
    persistent_client_expiration: str = Field(default="14d", pattern=r"^[0-9]+[hdwmy]$")
    log_types: list[Literal["error", "warning", "notice", "information", "debug", "all"]] = [
        "error", "warning", "notice", "information",
    ]
    server_hostnames: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"],
        description="Names and addresses in the TLS server certificate",
    )
    tls: TlsListenerSettings = Field(default_factory=TlsListenerSettings)

    @property
    def layout(self) -> BrokerLayout:
        """Paths inside :attr:`data_dir`."""
        return BrokerLayout(self.data_dir)


@dataclass(frozen=True, slots=True)
class BrokerLayout:
    """Where everything of one broker lives under its data folder."""

    root: Path

    @property
    def config(self) -> Path:
        """The rendered ``mosquitto.conf``."""
        return self.root / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        """The rendered ACL file."""
        return self.root / "acl"

    @property
    def passwd(self) -> Path:
        """Mosquitto password file of the devices (PBKDF2-SHA512 hashes only)."""
        return self.root / "passwd"

    @property
    def service_passwd(self) -> Path:
        """Password file of the service listener: the cloud and observers."""
        return self.root / "passwd-services"

    @property
    def observer_passwd(self) -> Path:
        """Password file of the observer listener."""
        return self.root / "passwd-observers"

    @property
    def observer_acl(self) -> Path:
        """The observers' read-only ACL."""
        return self.root / "acl-observers"

    @property
    def observers(self) -> Path:
        """Observers and the topic groups they read (JSON), rendered into their ACL."""
        return self.root / "observers.json"

    @property
    def persistence(self) -> Path:
        """Folder of ``mosquitto.db``."""
        return self.root / "data"

    @property
    def log(self) -> Path:
        """Broker log file when not logging to the terminal."""
        return self.root / "mosquitto.log"

    @property
    def secrets(self) -> Path:
        """Generated passwords, one file per identity, mode 0600."""
        return self.root / "secrets"

    @property
    def pki(self) -> Path:
        """Development CA, server and client certificates."""
        return self.root / "pki"

    @property
    def service_pki(self) -> Path:
        """The services' CA (the cloud's certificates), its server certificate and CRL."""
        return self.pki / "services"

    def secret_file(self, username: str) -> Path:
        """Password file of one identity."""
        return self.secrets / f"{username}.password"
