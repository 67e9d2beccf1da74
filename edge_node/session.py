"""The agent's MQTT session (paho-mqtt 2.x): birth/death with bdSeq, reconnects, limits.

One network thread per session runs paho's loop; it reconnects with jittered
exponential backoff, re-registers the will with a new ``bd_seq`` before every
connection attempt and publishes the birth with the same number once
connected. The session is persistent (MQTT 5 clean start off with a session
expiry, or 3.1.1 clean session off), so QoS 1 messages in flight survive a
reconnect.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_node.counters import Counters
from edge_node.errors import NotConnectedError, PacketTooLargeError
from edge_node.settings import EdgeSettings
from schemas.base import now
from schemas.device import DeviceState
from schemas.mqtt_properties import topic_properties, will_properties
from schemas.topics import Topics

logger = logging.getLogger(__name__)

AckCallback = Callable[[int], None]
"""Called with the PUBACK reason code (0 or 0x10 = accepted) in the network thread."""
ACCEPTED = frozenset({0x00, 0x10})
SESSION_TAKEN_OVER = 0x8E
"""DISCONNECT reason: another client connected with this client id (MQTT 5)."""
_PUBLISH_OVERHEAD = 64  # fixed header, lengths, packet id, properties (content type)
MAX_CACHED_TOPICS = 256


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    """Turn Nagle's algorithm off on the connection (paho leaves it on).

    MQTT's packets are small and answered: with Nagle on, a SUBSCRIBE or a PUBACK
    written while an earlier small packet is unacknowledged waits for the broker's
    delayed ACK, up to 40 ms on Linux (measured: a release's first chunk came 47 ms
    after the SUBSCRIBE, 3 ms with this).
    """
    setsockopt = getattr(sock, "setsockopt", None)  # a WebSocket wrapper has none
    if setsockopt is not None:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttSession:
    """paho client with a supervised connection and PUBACK tracking.

    Args:
        settings: the agent's settings.
        topics: topic builder for the agent's root.
        birth: makes the ``online`` DeviceState for a bd_seq.
        on_message: called in the network thread for every message.
        on_connected: called in the network thread after the birth was queued.
        counters: where the session counts what happened to it (``session_taken_over``);
            a private one when not given.
    """

    def __init__(
        self,
        settings: EdgeSettings,
        topics: Topics,
        *,
        birth: Callable[[int], DeviceState],
        on_message: Callable[[mqtt.MQTTMessage], None],
        on_connected: Callable[[], None] = lambda: None,
        counters: Counters | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.device_id = settings.device_id
        self._birth = birth
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.counters = counters if counters is not None else Counters()
        self._bd_seq_file = settings.state_dir / "bd_seq"
        self.bd_seq = self._load_bd_seq()
        self.connected = threading.Event()
        self.max_packet_size: int | None = None
        self.rtt_ms: float | None = None
        self.connect_count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[float, AckCallback | None]] = {}
        self._early: dict[int, tuple[float, int]] = {}
        self._subscriptions: dict[str, int] = {}
        self._unsubscribe_later: set[str] = set()
        """Filters unsubscribed while the connection was down: sent after the next CONNACK
        (the broker keeps a persistent session's subscriptions across connections)."""
        self._transport_up = False
        self._publish_properties: dict[str, Properties | None] = {}
        """CONNACK received on the current connection (subscriptions can be sent)."""
        self._thread: threading.Thread | None = None
        mqtt_settings = settings.mqtt
        v5 = mqtt_settings.protocol == 5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(settings.username, mqtt_settings.resolved_password())
        if mqtt_settings.tls is not None:
            tls = mqtt_settings.tls
            self.client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._ready_mid: int | None = None
        self.counters_refused_subscriptions = 0

    # -- bdSeq -----------------------------------------------------------------

    def _load_bd_seq(self) -> int:
        try:
            return int(self._bd_seq_file.read_text().strip())
        except (OSError, ValueError):
            return -1

    def _next_will(self) -> None:
        """New bd_seq for the next connection, persisted, and its will registered."""
        self.bd_seq += 1
        self._bd_seq_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._bd_seq_file.with_suffix(".tmp")
        tmp.write_text(f"{self.bd_seq}\n")
        os.replace(tmp, self._bd_seq_file)
        will = DeviceState(device_id=self.device_id, state="offline", bd_seq=self.bd_seq,
                           ts=now(), reason="lwt")
        topic = self.topics.device_state(self.device_id)
        self.client.will_set(topic, will.to_json(), qos=1, retain=True,
                             properties=will_properties(self.topics, topic,
                                                        protocol=self.settings.mqtt.protocol))

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the network thread; it connects (and reconnects) in the background."""
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.device_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        attempt = 0
        settings = self.settings.mqtt
        while not self._stop.is_set():
            self._next_will()
            properties = None
            if settings.protocol == 5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = settings.session_expiry_s
            try:
                self.client.connect(settings.host, settings.port, keepalive=settings.keepalive_s,
                                    clean_start=False if settings.protocol == 5 else
                                    mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                    properties=properties)
            except (OSError, ssl.SSLError) as exc:
                # Said at the default level the first time, then every tenth attempt.
                log = logger.warning if attempt % 10 == 0 else logger.info
                log("%s: cannot reach the broker at %s:%s (%s); retrying", self.device_id,
                    settings.host, settings.port, exc)
            else:
                before = self.connect_count
                self.client.loop_forever(retry_first_connection=False)
                self.connected.clear()
                if self.connect_count > before:
                    attempt = 0
            if self._stop.is_set():
                break
            cap = min(settings.reconnect_max_s, settings.reconnect_min_s * 2 ** min(attempt, 30))
            attempt += 1
            self._stop.wait(random.uniform(cap / 2, cap))  # noqa: S311 - jitter, not crypto
        logger.debug("%s: network thread ends", self.device_id)

    def stop(self, offline: DeviceState | None = None, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained) if connected, disconnect cleanly, end the thread."""
        if offline is not None and self.connected.is_set():
            try:
                self.publish_wait(self.topics.device_state(self.device_id), offline.to_json(),
                                  retain=True, timeout=timeout)
            except (NotConnectedError, TimeoutError) as exc:
                logger.warning("%s: offline state not acknowledged: %s", self.device_id, exc)
        self._stop.set()
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    def drop(self) -> None:
        """Cut the TCP connection without DISCONNECT (the broker sends the will)."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                logger.debug("socket already closed: %s", exc)

    # -- callbacks (network thread) ------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, rc: ReasonCode,
                    props: Properties | None) -> None:
        if rc.is_failure:
            logger.warning("%s: broker refused the connection: %s", self.device_id, rc)
            return
        self.connect_count += 1
        limit = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.max_packet_size = int(limit) if limit else None
        with self._lock:
            # From here on subscribe() sends at once; what was recorded before is in this
            # snapshot. Nothing recorded between CONNACK and SUBACK is left unsent.
            self._transport_up = True
            subscriptions = list(self._subscriptions.items())
            later = sorted(self._unsubscribe_later)
            self._unsubscribe_later.clear()
        self._send_unsubscribe(later)
        if subscriptions:
            # Birth only once the broker confirmed the subscriptions, so that a command
            # sent to a device the cloud saw born is never lost.
            _, self._ready_mid = client.subscribe(subscriptions)
        else:
            self._ready()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        refused = [c for c in codes if c.is_failure]
        if refused:
            self.counters_refused_subscriptions += len(refused)
            logger.warning("%s: broker refused %d subscription(s): %s", self.device_id,
                           len(refused), refused)
        if mid == self._ready_mid:
            self._ready_mid = None
            self._ready()

    def _ready(self) -> None:
        birth = self._birth(self.bd_seq)
        topic = self.topics.device_state(self.device_id)
        self.client.publish(topic, birth.to_json(), qos=1, retain=True,
                            properties=self._properties(topic))
        self.connected.set()
        logger.info("%s: connected (bd_seq %d, max packet %s)", self.device_id, self.bd_seq,
                    self.max_packet_size)
        self._on_connected_cb()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Properties | None) -> None:
        with self._lock:
            self._transport_up = False
        was = self.connected.is_set()
        self.connected.clear()
        if rc.value == SESSION_TAKEN_OVER:
            self.counters.add("session_taken_over")
            logger.warning("%s: session taken over: the broker disconnected this agent because "
                           "another client connected with the same client id (is the device "
                           "running twice?); reconnecting", self.device_id)
        elif was:
            logger.info("%s: disconnected: %s", self.device_id, rc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Properties | None) -> None:
        acked = time.monotonic()
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._early[mid] = (acked, rc.value)
                return
        self._acked(entry, acked, rc.value)

    def _acked(self, entry: tuple[float, AckCallback | None], acked: float, code: int) -> None:
        sent, callback = entry
        if code in ACCEPTED:
            self.rtt_ms = (acked - sent) * 1000.0
        if callback is not None:
            callback(code)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message_cb(msg)

    # -- publish / subscribe -------------------------------------------------

    def check_size(self, topic: str, payload: bytes) -> None:
        """Raise PacketTooLargeError above the broker's maximum packet size.

        The maximum is what the broker advertised (MQTT 5 CONNACK) or, when it
        advertises none (MQTT 3.1.1), ``mqtt.max_packet_bytes``: a packet the
        broker refuses would close the connection and be re-sent after every
        reconnect, wedging the session.
        """
        size = len(payload) + len(topic.encode()) + _PUBLISH_OVERHEAD
        limit = self.max_packet_size or self.settings.mqtt.max_packet_bytes
        if size > limit:
            raise PacketTooLargeError(topic, size, limit)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                on_ack: AckCallback | None = None) -> int:
        """QoS 1 publish; paho queues it while disconnected. Returns the message id."""
        self.check_size(topic, payload)
        sent = time.monotonic()
        info = self.client.publish(topic, payload, qos=1, retain=retain,
                                   properties=self._properties(topic) if payload else None)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = (sent, on_ack)
        if early is not None:
            self._acked((sent, on_ack), early[0], early[1])
        return info.mid

    def publish_wait(self, topic: str, payload: bytes, *, retain: bool = False,
                     timeout: float | None = None) -> int:
        """Publish and wait for the PUBACK; returns its reason code."""
        if not self.connected.is_set():
            raise NotConnectedError(f"publish on {topic}")
        done = threading.Event()
        codes: list[int] = []

        def on_ack(code: int) -> None:
            codes.append(code)
            done.set()

        self.publish(topic, payload, retain=retain, on_ack=on_ack)
        if not done.wait(timeout or self.settings.mqtt.publish_timeout_s):
            raise TimeoutError(f"no PUBACK for {topic}")
        return codes[0]

    def _properties(self, topic: str) -> Properties | None:
        """MQTT 5 content type and payload format indicator of ``topic``'s kind (cached)."""
        if self.settings.mqtt.protocol != 5:
            return None
        if topic not in self._publish_properties:
            properties = topic_properties(self.topics, topic, protocol=5)
            if len(self._publish_properties) < MAX_CACHED_TOPICS:
                self._publish_properties[topic] = properties
            return properties
        return self._publish_properties[topic]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if the connection is up) and after every reconnect."""
        self.subscribe_many([topic_filter], qos)

    def subscribe_many(self, filters: list[str], qos: int = 1) -> None:
        """Subscribe to several filters in as few SUBSCRIBE packets as possible."""
        with self._lock:
            for topic_filter in filters:
                self._subscriptions[topic_filter] = qos
                self._unsubscribe_later.discard(topic_filter)
            send = self._transport_up
        if send:
            for start in range(0, len(filters), 100):
                self.client.subscribe([(f, qos) for f in filters[start:start + 100]])

    def subscriptions(self) -> set[str]:
        """The filters this session holds (and subscribes again after a reconnect)."""
        with self._lock:
            return set(self._subscriptions)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter``."""
        self.unsubscribe_many([topic_filter])

    def unsubscribe_many(self, filters: list[str], *, force: bool = False) -> None:
        """Stop receiving several filters, in as few UNSUBSCRIBE packets as possible.

        Only filters this session subscribed, unless ``force``: those an earlier run of
        the process may have left on the broker's persistent session. While the
        connection is down they are sent after the next CONNACK.
        """
        with self._lock:
            gone = [f for f in filters if self._subscriptions.pop(f, None) is not None
                    or force]
            if not self._transport_up:
                self._unsubscribe_later.update(gone)
                return
        self._send_unsubscribe(gone)

    def _send_unsubscribe(self, filters: list[str]) -> None:
        for start in range(0, len(filters), 100):
            batch = filters[start:start + 100]
            code, _ = self.client.unsubscribe(batch)
            if code != mqtt.MQTT_ERR_SUCCESS:  # the connection just dropped: next time
                with self._lock:
                    self._unsubscribe_later.update(
                        f for f in batch if f not in self._subscriptions)
