"""MQTT 5 properties that say what a payload is: content type and payload format indicator.

Every publisher, edge or cloud, builds them here from the topic table
(:data:`schemas.catalog.CHANNELS`): ``application/json`` with the payload format
indicator 1 (UTF-8), any other type (safetensors, raw bytes) with 0. Under MQTT
3.1.1 there are no properties, and an empty payload (a retained "clear") carries
none either.

This module needs paho-mqtt, which the ``edge`` and ``cloud`` extras both install;
it is imported only by code that speaks MQTT.
"""

from __future__ import annotations

from typing import Final

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.catalog import JSON, content_type
from schemas.topics import Topics

MQTT5: Final = 5


def payload_properties(kind: str | None, *, protocol: int,
                       packet: int = PacketTypes.PUBLISH) -> Properties | None:
    """Content type ``kind`` and its payload format indicator; None under 3.1.1 or no kind.

    Args:
        kind: the MIME type of the payload.
        protocol: 5 (MQTT 5) or 4 (MQTT 3.1.1).
        packet: ``PacketTypes.PUBLISH``, or ``PacketTypes.WILLMESSAGE`` for a will.
    """
    if protocol != MQTT5 or kind is None:
        return None
    properties = Properties(packet)  # type: ignore[no-untyped-call]
    properties.ContentType = kind
    properties.PayloadFormatIndicator = 1 if kind == JSON else 0
    return properties


def topic_properties(topics: Topics, topic: str, *, protocol: int,
                     payload: bytes = b"-") -> Properties | None:
    """The publish properties of ``topic``'s kind; None for an empty payload or a foreign topic."""
    if not payload:
        return None
    return payload_properties(content_type(topics, topic), protocol=protocol)


def will_properties(topics: Topics, topic: str, *, protocol: int) -> Properties | None:
    """The same properties for a will (last will and testament) on ``topic``."""
    return payload_properties(content_type(topics, topic), protocol=protocol,
                              packet=PacketTypes.WILLMESSAGE)
