"""A small synchronous paho-mqtt client for integration tests.

Every wait is bounded and waits on a condition (a CONNACK, a PUBACK, a
message), never on a bare sleep.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 10.0


@dataclass(frozen=True)
class Received:
    """A message as received."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    content_type: str | None = None
    payload_format: int | None = None


@dataclass(frozen=True)
class TlsFiles:
    """Client side of an mTLS connection."""

    ca: Path
    cert: Path
    key: Path


class SyncClient:
    """paho client with blocking helpers that return reason codes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        protocol: int = 5,
        tls: TlsFiles | None = None,
        will: tuple[str, bytes, bool] | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.session_expiry = session_expiry
        version = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        self.protocol = protocol
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version,
            clean_session=None if protocol == 5 else clean,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            topic, payload, retain = will
            self.client.will_set(topic, payload, qos=1, retain=retain)
        self.messages: list[Received] = []
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        c = self.client
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    # -- callbacks (paho network thread) -------------------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            if self.connack is None:
                self.connack = rc
            self.disconnected.set()
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = rc.value
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = [rc.value for rc in rcs]
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            props = getattr(msg, "properties", None)
            self.messages.append(Received(
                msg.topic, bytes(msg.payload), msg.retain, msg.qos,
                getattr(props, "ContentType", None),
                getattr(props, "PayloadFormatIndicator", None)))
            self._cond.notify_all()

    # -- blocking API --------------------------------------------------------

    def connect(self, timeout: float = WAIT_S) -> ReasonCode:
        """Connect and return the CONNACK reason code (raises on timeout)."""
        if self.protocol == 5 and self.session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry
            self.client.connect(self.host, self.port, keepalive=30, clean_start=False,
                                properties=props)
        else:
            self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connack is not None, timeout):
                raise TimeoutError("no CONNACK")
            assert self.connack is not None
            return self.connack

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout: float = WAIT_S) -> int:
        """Publish and return the PUBACK reason code (QoS 1) or 0 once written (QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(timeout)
            return 0
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self._acks.pop(info.mid)

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = WAIT_S) -> list[int]:
        """Subscribe and return the SUBACK reason codes."""
        _, sub_mid = self.client.subscribe(topic_filter, qos=qos)
        assert sub_mid is not None
        mid: int = sub_mid
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic_filter}")
            return self._subacks.pop(mid)

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = WAIT_S,
                 ) -> Received:
        """First received message matching ``predicate`` (waits, bounded)."""
        with self._cond:
            found: list[Received] = []

            def check() -> bool:
                found[:] = [m for m in self.messages if predicate(m)][:1]
                return bool(found)

            if not self._cond.wait_for(check, timeout):
                raise TimeoutError("expected message did not arrive")
            return found[0]

    def wait_topic(self, topic: str, timeout: float = WAIT_S) -> Received:
        """First message received on ``topic``."""
        return self.wait_for(lambda m: m.topic == topic, timeout)

    def received_on(self, topic: str) -> list[Received]:
        """Every message received on ``topic`` so far."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def drop(self) -> None:
        """Abrupt loss: stop the loop and cut the socket, no DISCONNECT packet."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Clean DISCONNECT."""
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()
