"""An MQTT client for the command-line tools that talk to devices.

``edgefl cmd`` and ``edgefl model benchmark --devices`` connect with the cloud's
identity on the service listener, under a client id of their own, so the running
service's session is never taken over.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.settings import CloudSettings


class ToolClientError(Exception):
    """The broker could not be used; the message says why in one line.

    Attributes:
        unreachable: no connection at all (rather than a refusal or no answer).
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def connect(settings: CloudSettings, purpose: str, timeout: float = 30.0) -> mqtt.Client:
    """A connected client (network loop started) named ``edgefl-{purpose}-{random}``.

    Raises:
        ToolClientError: the broker is unreachable, refuses, or does not answer.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"edgefl-{purpose}-{secrets.token_hex(4)}",
                         protocol=mqtt.MQTTv5 if settings.mqtt.protocol == 5 else mqtt.MQTTv311)
    client.username_pw_set(settings.mqtt.username, settings.mqtt.resolved_password())
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        if rc.is_failure:
            refused.append(str(rc))
        connected.set()

    client.on_connect = on_connect
    where = f"{settings.mqtt.host}:{settings.mqtt.port}"
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port)
    except OSError as exc:
        raise ToolClientError(f"cannot reach the broker at {where}: {exc}",
                              unreachable=True) from None
    client.loop_start()
    if not connected.wait(timeout) or refused:
        client.loop_stop()
        raise ToolClientError(f"the broker refused the connection: {refused[0]}" if refused
                              else f"no answer from the broker at {where}")
    return client


def subscribe(client: mqtt.Client, topics: list[str], timeout: float) -> None:
    """Subscribe (QoS 1) and wait for the broker's SUBACK.

    Raises:
        ToolClientError: no SUBACK within ``timeout``.
    """
    acked = threading.Event()
    client.on_subscribe = lambda *_a: acked.set()
    client.subscribe([(t, 1) for t in topics])
    if not acked.wait(timeout):
        raise ToolClientError("the broker did not confirm the subscription")


def close(client: mqtt.Client) -> None:
    """Disconnect and stop the network loop."""
    client.disconnect()
    client.loop_stop()
