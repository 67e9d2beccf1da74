"""MQTT client settings shared by the edge agent and the cloud service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class SettingsSection(BaseModel):
    """A section of a settings file: an unknown key (a typo) is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


class TlsClientSettings(SettingsSection):
    """Client side of TLS; with cert and key it is mTLS (the CN is the identity)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttClientSettings(SettingsSection):
    """Where and how a client connects."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal[5, 4] = Field(default=5, description="5 = MQTT 5, 4 = MQTT 3.1.1")
    password: SecretStr | None = None
    password_file: Path | None = Field(default=None, description="File holding the password")
    tls: TlsClientSettings | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0

    def resolved_password(self) -> str | None:
        """The password from settings or its file (never logged)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return None
