"""``edgefl node`` (one agent) and ``edgefl fleet`` (a simulated fleet)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_node.agent import EdgeAgent
from edge_node.fleet import MAX_AGENTS_PER_PROCESS, Fleet, fleet_settings
from edge_node.settings import EdgeSettings, MqttSettings
from schemas.errors import SchemaError
from schemas.topics import DEFAULT_ROOT

logger = logging.getLogger(__name__)

node_app = typer.Typer(name="node", help="Run one edge agent in the foreground.",
                       invoke_without_command=True)
fleet_app = typer.Typer(name="fleet", help="Run a simulated fleet of real agents.",
                        invoke_without_command=True)


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 1883)."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    try:
        return host, int(port)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not HOST:PORT") from None


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_a: stop.set())
    return stop


def _mqtt_overrides(broker: str | None, protocol: int | None, username: str | None,
                    password_file: Path | None, tls_ca: Path | None, tls_cert: Path | None,
                    tls_key: Path | None) -> dict[str, Any]:
    mqtt: dict[str, Any] = {}
    if broker:
        mqtt["host"], mqtt["port"] = parse_broker(broker)
    if protocol:
        mqtt["protocol"] = protocol
    if username:
        mqtt["username"] = username
    if password_file:
        mqtt["password_file"] = password_file
    if tls_ca:
        mqtt["tls"] = {"ca_file": tls_ca, "cert_file": tls_cert, "key_file": tls_key}
    return mqtt


@node_app.callback()
def node(
    device_id: Annotated[str | None, typer.Option(help="Device id = MQTT username")] = None,
    broker: Annotated[str | None, typer.Option(help="HOST:PORT of the broker")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML/YAML settings file")] = None,
    username: Annotated[str | None, typer.Option(help="MQTT username [device id]")] = None,
    password_file: Annotated[Path | None, typer.Option(help="File with the password")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA file: connect with TLS")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate (mTLS)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key (mTLS)")] = None,
    protocol: Annotated[int | None, typer.Option(help="5 (MQTT 5) or 4 (3.1.1)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Buffer, models, state")] = None,
    interval: Annotated[float | None, typer.Option(help="Telemetry interval, s")] = None,
) -> None:
    """Run until Ctrl-C/SIGTERM, then publish `offline` and disconnect cleanly."""
    explicit: dict[str, Any] = {"device_id": device_id, "state_dir": state_dir}
    mqtt = _mqtt_overrides(broker, protocol, username, password_file, tls_ca, tls_cert, tls_key)
    if mqtt:
        explicit["mqtt"] = mqtt
    if interval:
        explicit["telemetry"] = {"interval_s": interval}
    try:
        settings = EdgeSettings.load(config, **explicit)
    except (SchemaError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    if state_dir is None and "EDGEFL_EDGE_STATE_DIR" not in os.environ:
        # default layout: one sub-folder per device under var/edge
        settings = settings.model_copy(
            update={"state_dir": settings.state_dir / settings.device_id})
    agent = EdgeAgent(settings)
    typer.echo(f"{settings.device_id}: connecting to {settings.mqtt.host}:{settings.mqtt.port}")
    agent.run_forever(_stop_on_signals())
    typer.echo(f"{settings.device_id}: stopped")


@fleet_app.callback()
def fleet(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Number of agents")] = 10,
    broker: Annotated[str, typer.Option(help="HOST:PORT of the broker")] = "127.0.0.1:1883",
    secrets_dir: Annotated[Path | None, typer.Option(
        help="Folder of {id}.password files (the broker's secrets folder)")] = None,
    prefix: Annotated[str, typer.Option(help="Device ids are {prefix}{i:03d}")] = "sim-",
    first_index: Annotated[int, typer.Option(min=0, help="Index of the first device")] = 0,
    state_dir: Annotated[Path, typer.Option(help="One sub-folder per device")] = Path("var/fleet"),
    interval: Annotated[float, typer.Option(help="Telemetry interval, s")] = 10.0,
    protocol: Annotated[int, typer.Option(help="5 (MQTT 5) or 4 (3.1.1)")] = 5,
    topic_root: Annotated[str, typer.Option(help="Topic root")] = DEFAULT_ROOT,
    per_process: Annotated[int, typer.Option(
        min=1, max=MAX_AGENTS_PER_PROCESS, help="Agents per process")] = MAX_AGENTS_PER_PROCESS,
) -> None:
    """Run N agents until Ctrl-C (in several processes when N > --per-process)."""
    stop = _stop_on_signals()
    if devices > per_process:
        _run_processes(devices, per_process, first_index, stop, [
            "--broker", broker, "--prefix", prefix, "--state-dir", str(state_dir),
            "--interval", str(interval), "--protocol", str(protocol),
            "--topic-root", topic_root,
            *(["--secrets-dir", str(secrets_dir)] if secrets_dir else []),
        ])
        return
    host, port = parse_broker(broker)
    settings = fleet_settings(devices, prefix=prefix, state_root=state_dir,
                              mqtt=MqttSettings(host=host, port=port,
                                                protocol=5 if protocol == 5 else 4),
                              secrets_dir=secrets_dir, interval_s=interval,
                              first_index=first_index, topic_root=topic_root)
    sim = Fleet(settings, state_dir)
    sim.start()
    connected = sim.wait_connected(60)
    typer.echo(f"{connected}/{devices} agents connected to {host}:{port}; Ctrl-C stops them")
    stop.wait()
    sim.stop()
    typer.echo("fleet stopped")


def _run_processes(devices: int, per_process: int, first_index: int, stop: threading.Event,
                   options: list[str]) -> None:
    children = []
    for start in range(first_index, first_index + devices, per_process):
        count = min(per_process, first_index + devices - start)
        children.append(subprocess.Popen([
            sys.executable, "-m", "edge_node", "fleet", "--devices", str(count),
            "--first-index", str(start), *options,
        ]))
    typer.echo(f"{devices} agents in {len(children)} processes; Ctrl-C stops them")
    while not stop.wait(0.5):
        if all(child.poll() is not None for child in children):
            break
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    codes = [child.wait() for child in children]
    if any(codes):
        raise typer.Exit(1)
