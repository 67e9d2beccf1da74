"""One call that gives the demo a running local broker: Mosquitto, or amqtt as fallback."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.embedded import EmbeddedBroker
from broker.launcher import MosquittoProcess, find_mosquitto, free_port
from broker.provision import Identity, add_identity, init_broker, write_config_files
from broker.settings import BrokerSettings

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
) -> LocalBroker:
    """Start Mosquitto from edgefl's rendered config, or amqtt when it is not installed.

    Args:
        data_dir: folder for config, secrets and persistence.
        port: listener port; a free one by default.
        device_ids: identities to provision (Mosquitto only).
        kind: ``auto`` (Mosquitto when installed, else amqtt), or force one; forcing
            ``mosquitto`` raises MosquittoNotFoundError when it is missing.
    """
    port = port or free_port()
    settings = BrokerSettings(data_dir=data_dir, port=port, service_port=free_port(),
                              observer_port=free_port())
    if kind == "amqtt" or (kind == "auto" and find_mosquitto() is None):
        embedded = EmbeddedBroker(settings.host, port).start()
        return LocalBroker("amqtt", settings.host, port, settings, _embedded=embedded)
    cloud = init_broker(settings, log_to_file=True)
    identities = {cloud.username: cloud}
    for device_id in device_ids:
        identities[device_id] = add_identity(settings, device_id)
    config = write_config_files(settings, log_to_file=True)
    process = MosquittoProcess(
        config, settings.host, port,
        log_file=settings.layout.log, pid_file=settings.layout.root / "mosquitto.pid",
    ).start()
    return LocalBroker("mosquitto", settings.host, port, settings, identities, _mosquitto=process)
