"""``edgefl cmd DEVICE NAME [--arg k=v ...]``: send a command, print the device's reply.

It connects with the cloud's identity on the service listener, under a client id
of its own (it never takes the running service's session), subscribes to the
reply topic before sending, and waits (bounded) for the result with the same
correlation id.
"""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import paho.mqtt.client as mqtt
import typer

from cloud import tool_client
from cloud.settings import CloudSettings
from schemas.base import decode_message, now
from schemas.device import Command, CommandResult, CommandStatus
from schemas.errors import DecodeError, SchemaError
from schemas.mqtt_properties import topic_properties
from schemas.topics import Topics, validate_id


def parse_args(items: list[str] | None) -> dict[str, Any]:
    """``k=v`` items; a value that reads as JSON (a number, true, a list) is taken as such.

    Raises:
        typer.BadParameter: an item without ``=``.
    """
    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def cmd(
    device_id: Annotated[str, typer.Argument(help="Device id")],
    name: Annotated[str, typer.Argument(help="Command: ping, report_now, rollback, ...")],
    arg: Annotated[list[str] | None, typer.Option(
        "--arg", help="KEY=VALUE argument (repeatable; JSON values are parsed)")] = None,
    broker: Annotated[str | None, typer.Option(help="HOST:PORT of the service listener")] = None,
    password_file: Annotated[Path | None, typer.Option(help="Cloud MQTT password file")] = None,
    config: Annotated[Path | None, typer.Option(help="The cloud's settings file")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply")] = 10.0,
) -> None:
    """Send one command to a device and print its reply; exit 1 on an error or no reply."""
    try:
        validate_id(device_id, "device id")
        validate_id(name, "command")
        args = parse_args(arg)
        mqtt_values: dict[str, Any] = {}
        if broker:
            host, _, port = broker.rpartition(":") if ":" in broker else (broker, "", "1884")
            mqtt_values |= {"host": host, "port": int(port)}
        if password_file:
            mqtt_values["password_file"] = password_file
        settings = CloudSettings.load(config, mqtt=mqtt_values or None)
        settings.mqtt.resolved_password()  # a missing password file: exit 2 here
        command = Command(correlation_id=f"cli-{secrets.token_hex(6)}", ts=now(), args=args)
    except (SchemaError, ValueError, OSError, typer.BadParameter) as exc:
        typer.secho(f"error: {' '.join(str(exc).split())[:300]}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2) from None
    topics = Topics(settings.topic_root)
    reply_topic = topics.command_reply(device_id, name)
    result = _exchange(settings, topics, topics.command(device_id, name), reply_topic, command,
                       timeout)
    typer.echo(result.model_dump_json(indent=2))
    if result.status is not CommandStatus.OK:
        raise typer.Exit(1)


def _exchange(settings: CloudSettings, topics: Topics, topic: str, reply_topic: str,
              command: Command, timeout: float) -> CommandResult:
    got: list[CommandResult] = []
    answered = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            result = decode_message(CommandResult, message.payload)
        except DecodeError:
            return
        if result.correlation_id == command.correlation_id:
            got.append(result)
            answered.set()

    try:
        client = tool_client.connect(settings, "cmd", timeout)
    except tool_client.ToolClientError as exc:
        if exc.unreachable:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        _fail(str(exc))
    client.on_message = on_message
    try:
        tool_client.subscribe(client, [reply_topic], timeout)
        payload = command.to_json()
        properties = topic_properties(topics, topic, protocol=settings.mqtt.protocol,
                                      payload=payload)
        client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(timeout)
        if not answered.wait(timeout) or not got:
            _fail(f"no reply within {timeout:.0f} s (is the device online?)")
        return got[0]
    except tool_client.ToolClientError as exc:
        _fail(str(exc))
    finally:
        tool_client.close(client)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
