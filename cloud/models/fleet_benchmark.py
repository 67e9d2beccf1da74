"""The benchmark on the devices themselves: ``edgefl model benchmark N V --devices a,b``.

Figures measured on the cloud's machine say little about a Raspberry Pi, so the
version is sent to chosen devices as a release would be, but not installed: the
chunks are published retained, then each device gets a ``benchmark`` command
carrying the signed manifest. The device checks the signature, its compatibility,
size and sha256, loads the model in its own runtime, times it (the same code as
``edgefl model benchmark FILE``: ``edge_node.benchmark``) and replies with the
figures and its device class. The figures go into the registry per device class
(source ``fleet-benchmark``). When every device has answered (or the time is up)
the chunks are cleared again, unless the version is the one released for the
model (or one of its variants), whose chunks stay for the devices that install it.

It connects with the cloud's identity on the service listener under a client id
of its own, like ``edgefl cmd``: the running service's session is never taken.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from pydantic import JsonValue

from cloud import tool_client
from cloud.models.registry import ModelRegistry, ModelVersion
from cloud.releases import build_release, load_signing_key
from cloud.settings import CloudSettings
from schemas.base import decode_message, now
from schemas.device import Command, CommandResult, CommandStatus
from schemas.errors import DecodeError
from schemas.mqtt_properties import topic_properties
from schemas.release import MAX_CHUNK_BYTES, Targeting
from schemas.topics import Topics

logger = logging.getLogger(__name__)

SOURCE = "fleet-benchmark"
FIGURES = ("latency_ms_mean", "latency_ms_std", "latency_ms_p50", "latency_ms_p95",
           "latency_ms_p99", "throughput_per_s", "peak_rss_mb", "model_memory_mb")


class FleetBenchmarkError(Exception):
    """The benchmark could not be sent; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class DeviceAnswer:
    """One device's answer: its figures, or why it has none."""

    device_id: str
    figures: dict[str, JsonValue] | None
    error: str | None

    def metrics(self) -> dict[str, float]:
        """The figures the registry keeps."""
        figures = self.figures or {}
        out = {name: float(value) for name in FIGURES
               if isinstance(value := figures.get(name), int | float)
               and not isinstance(value, bool)}
        if "peak_rss_mb" in out:
            out["peak_memory_mb"] = out.pop("peak_rss_mb")
        return out


@dataclass(frozen=True, slots=True)
class Options:
    """What each device runs."""

    runs: int = 1000
    warmup: int = 50
    threads: int = 1
    batch: int = 1
    timeout_s: float = 120.0


def fleet_benchmark(settings: CloudSettings, registry: ModelRegistry, version: ModelVersion,
                    devices: Sequence[str], options: Options, *,
                    keep_chunks: bool) -> list[DeviceAnswer]:
    """Benchmark ``version`` on ``devices``; every device's answer, in the order given.

    Args:
        settings: the cloud's settings (broker, release key).
        registry: where the figures are recorded.
        version: a deployable version.
        devices: device ids.
        options: runs, warm-up, threads, batch and how long to wait for the answers.
        keep_chunks: leave the retained chunks (the version is the model's release).

    Raises:
        FleetBenchmarkError: no release key, the broker unreachable or refusing.
    """
    fmt = version.format.deployable
    if fmt is None:
        raise FleetBenchmarkError(f"{version.model} {version.version} is not deployable")
    if not settings.release_key_path.exists():
        raise FleetBenchmarkError(f"no release key at {settings.release_key_path}: run "
                                  "`edgefl model keygen`")
    key = load_signing_key(settings.release_key_path)
    manifest, chunks = build_release(
        version.model, version.version, registry.read(version), fmt=fmt, key=key,
        key_id=settings.models.key_id,
        chunk_size=min(settings.models.chunk_bytes, MAX_CHUNK_BYTES),
        targeting=Targeting(stage="fleet", devices=list(devices)),
        input_shape=version.input_shape, metadata={"purpose": "benchmark"})
    topics = Topics(settings.topic_root)
    args: dict[str, JsonValue] = {
        "manifest": manifest.model_dump(mode="json"), "runs": options.runs,
        "warmup": options.warmup, "threads": options.threads, "batch": options.batch}
    commands = {d: Command(correlation_id=f"bench-{secrets.token_hex(6)}", ts=now(), args=args,
                           expires_at=now() + options.timeout_s) for d in devices}
    answers: dict[str, DeviceAnswer] = {}
    done = threading.Event()
    lock = threading.Lock()
    try:
        client = tool_client.connect(settings, "bench")
    except tool_client.ToolClientError as exc:
        raise FleetBenchmarkError(str(exc)) from None

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            result = decode_message(CommandResult, message.payload)
        except DecodeError:
            return
        sent = commands.get(result.device_id)
        if sent is None or result.correlation_id != sent.correlation_id:
            return
        with lock:
            answers[result.device_id] = DeviceAnswer(
                result.device_id, result.result if result.status is CommandStatus.OK else None,
                result.error)
            if len(answers) == len(commands):
                done.set()

    client.on_message = on_message
    protocol = settings.mqtt.protocol
    chunk_topics = [topics.chunk(version.model, version.version, i) for i in range(len(chunks))]
    try:
        tool_client.subscribe(client, [topics.command_reply(d, "benchmark") for d in devices],
                              options.timeout_s)
        for topic, data in zip(chunk_topics, chunks, strict=True):
            client.publish(topic, data, qos=1, retain=True,
                           properties=topic_properties(topics, topic, protocol=protocol,
                                                       payload=data),
                           ).wait_for_publish(options.timeout_s)
        for device, command in commands.items():
            topic, payload = topics.command(device, "benchmark"), command.to_json()
            client.publish(topic, payload, qos=1,
                           properties=topic_properties(topics, topic, protocol=protocol,
                                                       payload=payload),
                           ).wait_for_publish(options.timeout_s)
        done.wait(options.timeout_s)
    except tool_client.ToolClientError as exc:
        raise FleetBenchmarkError(str(exc)) from None
    finally:
        try:
            if not keep_chunks:
                for topic in chunk_topics:
                    client.publish(topic, b"", qos=1, retain=True).wait_for_publish(
                        options.timeout_s)
        finally:
            tool_client.close(client)
    return _record(registry, version, [answers.get(d) or DeviceAnswer(
        d, None, f"no answer within {options.timeout_s:.0f} s (is it online?)")
        for d in devices])


def _record(registry: ModelRegistry, version: ModelVersion,
            answers: list[DeviceAnswer]) -> list[DeviceAnswer]:
    """Keep the devices' figures in the registry, per device class; the answers."""
    for answer in answers:
        figures = answer.metrics()
        if figures and answer.figures is not None:
            registry.add_metrics(version.model, version.version, SOURCE, figures,
                                 device_class=str(answer.figures.get("device_class")
                                                  or answer.device_id))
    return answers
