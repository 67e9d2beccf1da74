"""One call that gives the demo a running local broker: Mosquitto, or amqtt as fallback."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError
from broker.launcher import MosquittoProcess, find_mosquitto, free_port
from broker.provision import Identity, add_identity, init_broker, write_config_files
from broker.settings import BrokerSettings, TlsListenerSettings

logger = logging.getLogger(__name__)


@dataclass
class LocalBroker:
    """A broker started for this process, with the identities provisioned on it.

    Attributes:
        kind: ``mosquitto`` (ACL, passwords, MQTT 5) or ``amqtt`` (anonymous, 3.1.1).
        identities: username -> identity; empty for amqtt (anonymous).
    """

    kind: Literal["mosquitto", "amqtt"]
    host: str
    port: int
    settings: BrokerSettings
    identities: dict[str, Identity] = field(default_factory=dict)
    _mosquitto: MosquittoProcess | None = None
    _embedded: EmbeddedBroker | None = None

    @property
    def service_port(self) -> int:
        """Where the cloud connects: Mosquitto's service listener (amqtt has one port)."""
        return self.settings.service_port if self.kind == "mosquitto" else self.port

    def port_for(self, username: str) -> int:
        """The listener of an identity: services on the service port, devices on the other."""
        return self.service_port if username == self.settings.cloud_username else self.port

    @property
    def mqtt5(self) -> bool:
        """Whether the broker speaks MQTT 5."""
        return self.kind == "mosquitto"

    @property
    def tls(self) -> bool:
        """Whether clients connect with certificates (mTLS listeners) instead of passwords."""
        return self.kind == "mosquitto" and self.settings.tls.enabled

    def client_settings(self, username: str) -> dict[str, Any]:
        """The ``mqtt`` section of an agent's or the cloud's settings for ``username``.

        With TLS: the identity's certificate on the mTLS listener of its kind (the
        services' listener for the cloud), no password. Else its password, if any.
        """
        mqtt: dict[str, Any] = {"host": self.host, "port": self.port_for(username),
                                "protocol": 5 if self.mqtt5 else 4}
        if self.tls:
            mqtt["port"] = self.tls_port_for(username)
            mqtt["tls"] = self.tls_files(username)
            return mqtt
        creds = self.credentials(username)
        if creds is not None:
            mqtt["password"] = creds[1]
        return mqtt

    def tls_port_for(self, username: str) -> int:
        """The mTLS listener of an identity: services' for the cloud, devices' for others."""
        tls = self.settings.tls
        return tls.service_port if username == self.settings.cloud_username else tls.port

    def tls_files(self, username: str) -> dict[str, Path]:
        """CA (of the listener's server certificate), certificate and key of ``username``."""
        cert = self.identities[username].cert
        if cert is None:
            raise BrokerError(f"{username} has no certificate (broker started without TLS)")
        layout = self.settings.layout
        ca = layout.service_pki if username == self.settings.cloud_username else layout.pki
        return {"ca_file": ca / "ca.crt", "cert_file": cert.cert, "key_file": cert.key}

    def credentials(self, username: str) -> tuple[str, str] | None:
        """(username, password) for a provisioned identity; None on the anonymous broker."""
        identity = self.identities.get(username)
        return None if identity is None else (identity.username, identity.password())

    def stop(self) -> None:
        """Stop the broker."""
        if self._mosquitto is not None:
            self._mosquitto.stop()
        if self._embedded is not None:
            self._embedded.stop()


def start_local_broker(
    data_dir: Path,
    *,
    port: int | None = None,
    device_ids: list[str] | tuple[str, ...] = (),
    kind: Literal["auto", "mosquitto", "amqtt"] = "auto",
    tls: bool = False,
) -> LocalBroker:
    """Start Mosquitto from edgefl's rendered config, or amqtt when it is not installed.

    Args:
        data_dir: folder for config, secrets and persistence.
        port: listener port; a free one by default.
        device_ids: identities to provision (Mosquitto only).
        kind: ``auto`` (Mosquitto when installed, else amqtt), or force one; forcing
            ``mosquitto`` raises MosquittoNotFoundError when it is missing.
        tls: also open the mTLS listeners (devices', services') and give every
            identity a certificate; Mosquitto only.

    Raises:
        BrokerError: ``tls`` with the embedded broker (no TLS there).
    """
    port = port or free_port()
    listeners = TlsListenerSettings(enabled=tls, port=free_port(), service_port=free_port())
    settings = BrokerSettings(data_dir=data_dir, port=port, service_port=free_port(),
                              observer_port=free_port(), tls=listeners)
    if tls and (kind == "amqtt" or (kind == "auto" and find_mosquitto() is None)):
        raise BrokerError("TLS needs Mosquitto (`sudo apt-get install mosquitto`); the "
                          "embedded amqtt broker has no TLS listener here")
    if kind == "amqtt" or (kind == "auto" and find_mosquitto() is None):
        embedded = EmbeddedBroker(settings.host, port).start()
        return LocalBroker("amqtt", settings.host, port, settings, _embedded=embedded)
    cloud = init_broker(settings, log_to_file=True)
    identities = {cloud.username: cloud}
    for device_id in device_ids:
        identities[device_id] = add_identity(settings, device_id, tls=tls)
    config = write_config_files(settings, log_to_file=True)
    process = MosquittoProcess(
        config, settings.host, port,
        log_file=settings.layout.log, pid_file=settings.layout.root / "mosquitto.pid",
    ).start()
    return LocalBroker("mosquitto", settings.host, port, settings, identities, _mosquitto=process)
