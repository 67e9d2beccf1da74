"""The cloud's MQTT connection: aiomqtt with acknowledgements after commit.

aiomqtt 2.5 has no manual acknowledgement (its pull request 346 is open), so
this module is the one place that reaches into the underlying paho client:
``manual_ack_set(True)`` before connecting, ``ack(mid, qos)`` once a message
is committed or deliberately refused. The session is persistent (fixed client
id per instance, clean start off, a session expiry), so whatever was received
but not acknowledged when the connection or the process died is delivered
again by the broker. The MQTT 5 Receive Maximum bounds how many unacknowledged
messages the broker hands over at once, which is also what bounds the
service's memory for messages in progress.

Every wait here is bounded with ``asyncio.timeout`` and aiomqtt's own
``asyncio.wait_for`` is disabled (``timeout=math.inf``): on Python 3.11
``wait_for`` can swallow a cancellation that lands as its awaited event fires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud.errors import CloudOffline
from cloud.settings import CloudSettings
from schemas.mqtt_properties import payload_properties

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message and what is needed to acknowledge it later.

    Attributes:
        topic: the topic it was published on.
        payload: the raw payload.
        qos: 0 or 1 (QoS 2 is not used by edgefl).
        retain: whether it came from the broker's retained store.
        mid: the packet id to acknowledge.
        generation: the connection it arrived on; an acknowledgement for an
            earlier connection is never sent (the broker redelivers instead).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


class MqttLink:
    """Owns the current aiomqtt client of one cloud instance.

    Args:
        settings: the instance's settings.
        will: topic and payload of the retained will (the ``offline`` state).
    """

    def __init__(self, settings: CloudSettings, will: tuple[str, bytes]) -> None:
        self.settings = settings
        self.will = will
        self.generation = 0
        self.connected = asyncio.Event()
        self.acks_sent = 0
        self.acks_stale = 0
        self._client: aiomqtt.Client | None = None

    # -- connection ---------------------------------------------------------------

    def _build(self) -> aiomqtt.Client:
        mqtt = self.settings.mqtt
        v5 = mqtt.protocol == 5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = mqtt.session_expiry_s
            properties.ReceiveMaximum = mqtt.receive_maximum
        tls = None
        if mqtt.tls is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(mqtt.tls.ca_file),
                certfile=str(mqtt.tls.cert_file) if mqtt.tls.cert_file else None,
                keyfile=str(mqtt.tls.key_file) if mqtt.tls.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        session: dict[str, Any] = {"clean_start": False} if v5 else {"clean_session": False}
        topic, payload = self.will
        client = aiomqtt.Client(
            mqtt.host, mqtt.port, identifier=self.settings.client_id,
            username=mqtt.username, password=mqtt.resolved_password(),
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            **session,
            properties=properties, keepalive=mqtt.keepalive_s, tls_params=tls,
            will=aiomqtt.Will(topic, payload, qos=1, retain=True),
            max_queued_incoming_messages=0,
            # Nagle off: small packets (PUBACK, SUBSCRIBE, commands) go at once instead
            # of waiting for the broker's delayed ACK (up to 40 ms on Linux).
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            # Our waits are bounded with asyncio.timeout; aiomqtt's wait_for is not used.
            timeout=math.inf,
        )
        # The one reach into paho: PUBACK only when ack() is called (after commit).
        client._client.manual_ack_set(True)
        return client

    async def connect(self) -> None:
        """Connect (bounded by the connect timeout); raises aiomqtt.MqttError."""
        client = self._build()
        try:
            async with asyncio.timeout(self.settings.mqtt.connect_timeout_s):
                await client.__aenter__()
        except TimeoutError:
            raise aiomqtt.MqttError(
                f"no CONNACK from {self.settings.mqtt.host}:{self.settings.mqtt.port} within "
                f"{self.settings.mqtt.connect_timeout_s} s") from None
        self.generation += 1
        self._client = client
        self.connected.set()

    async def disconnect(self) -> None:
        """Disconnect cleanly when possible (bounded); never raises on a dead socket."""
        client, self._client = self._client, None
        self.connected.clear()
        if client is None:
            return
        try:
            async with asyncio.timeout(self.settings.mqtt.publish_timeout_s):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            logger.info("disconnect was not clean: %s", exc)

    @property
    def client(self) -> aiomqtt.Client:
        """The connected client (raises CloudOffline between connections)."""
        if self._client is None:
            raise CloudOffline("not connected to the broker")
        return self._client

    # -- in -----------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[Inbound]:
        """Messages in arrival order until the connection is lost (MqttError)."""
        client = self.client
        queue = client._queue
        disconnected = client._disconnected
        generation = self.generation
        while True:
            if queue.empty():
                getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
                waiting: list[asyncio.Future[Any]] = [getter, disconnected]
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)

                finally:
                    if not getter.done():
                        getter.cancel()
                if not getter.done() or getter.cancelled():
                    error = disconnected.exception() if disconnected.done() else None
                    raise aiomqtt.MqttError(f"disconnected: {error}")
                message = getter.result()
            else:
                message = queue.get_nowait()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            yield Inbound(message.topic.value, payload, message.qos, message.retain,
                          message.mid, generation)

    def ack(self, message: Inbound) -> None:
        """Acknowledge (PUBACK) a message once it is committed or refused on purpose.

        A message from an earlier connection is not acknowledged: the broker has
        already queued it again for this persistent session.
        """
        if message.qos == 0:
            return
        client = self._client
        if client is None or message.generation != self.generation:
            self.acks_stale += 1
            return
        client._client.ack(message.mid, message.qos)
        self.acks_sent += 1

    # -- out ------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      content_type: str | None = None) -> None:
        """QoS 1 publish, waiting (bounded) for the PUBACK.

        Raises:
            CloudOffline: not connected, or the connection failed meanwhile.
        """
        client = self.client
        properties = payload_properties(content_type if payload else None,
                                        protocol=self.settings.mqtt.protocol)
        try:
            async with asyncio.timeout(self.settings.mqtt.publish_timeout_s):
                await client.publish(topic, payload, qos=1, retain=retain,
                                     properties=properties, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            raise CloudOffline(f"publish on {topic} failed: {exc}") from exc
        except TimeoutError:
            raise CloudOffline(f"no PUBACK for {topic} within "
                               f"{self.settings.mqtt.publish_timeout_s} s") from None

    async def subscribe(self, filters: list[str], *,
                        retain_as_published: frozenset[str] = frozenset()) -> None:
        """Subscribe to ``filters`` at QoS 1 (bounded wait for the SUBACK).

        Filters in ``retain_as_published`` keep the publisher's retain flag (MQTT 5),
        so that a device publishing retained where it must not is seen doing so.
        """
        client = self.client
        v5 = self.settings.mqtt.protocol == 5
        try:
            async with asyncio.timeout(self.settings.mqtt.publish_timeout_s):
                for topic_filter in filters:
                    if v5 and topic_filter in retain_as_published:
                        options = SubscribeOptions(qos=1, retainAsPublished=True)
                        await client.subscribe(topic_filter, options=options, timeout=math.inf)
                    else:
                        await client.subscribe(topic_filter, qos=1, timeout=math.inf)
        except TimeoutError:
            raise aiomqtt.MqttError("no SUBACK within "
                                    f"{self.settings.mqtt.publish_timeout_s} s") from None
