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
from edge_node.errors import EdgeError
from edge_node.fleet import (
    MAX_AGENTS_PER_PROCESS,
    Fleet,
    Traffic,
    fleet_settings,
    missing_passwords,
)
from edge_node.heterogeneity import HeterogeneityProfile, device_profiles
from edge_node.settings import EdgeSettings, FLTaskSettings
from fl_tasks.errors import TaskError
from schemas.errors import SchemaError
from schemas.settings_files import first_missing, read_config_file, remove_made
from schemas.topics import DEFAULT_ROOT, validate_id

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


def parse_fl_tasks(items: list[str] | None) -> dict[str, str]:
    """``NAME=package.module:Class`` items -> {name: import path}.

    Raises:
        ValueError: an item is not of that form.
    """
    tasks: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or ":" not in path:
            raise ValueError(f"--fl-task {item!r}: expected NAME=package.module:Class")
        tasks[validate_id(name, "task name")] = path
    return tasks


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
    fl_task: Annotated[list[str] | None, typer.Option(
        help="Join a federated task: NAME=package.module:Class (repeatable)")] = None,
) -> None:
    """Run until Ctrl-C/SIGTERM, then publish `offline` and disconnect cleanly."""
    explicit: dict[str, Any] = {"device_id": device_id, "state_dir": state_dir}
    mqtt = _mqtt_overrides(broker, protocol, username, password_file, tls_ca, tls_cert, tls_key)
    if mqtt:
        explicit["mqtt"] = mqtt
    if interval:
        explicit["telemetry"] = {"interval_s": interval}
    try:
        tasks = parse_fl_tasks(fl_task)
        settings = EdgeSettings.load(config, **explicit)
        if tasks:
            joined = {**settings.fl.tasks, **{n: FLTaskSettings(path=p) for n, p in tasks.items()}}
            settings = settings.model_copy(
                update={"fl": settings.fl.model_copy(update={"tasks": joined})})
    except (SchemaError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    password = settings.mqtt.password_file
    if password is not None and not password.is_file():
        typer.secho(f"error: no password file {password} (provision the device: "
                    f"edgefl broker add-device {settings.device_id})", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    if state_dir is None and "EDGEFL_EDGE_STATE_DIR" not in os.environ:
        # default layout: one sub-folder per device under var/edge
        settings = settings.model_copy(
            update={"state_dir": settings.state_dir / settings.device_id})
    created = first_missing(settings.state_dir)
    try:
        agent = EdgeAgent(settings)
    except (TaskError, EdgeError, OSError, ImportError) as exc:
        typer.secho(f"error: {' '.join(str(exc).split())[:400]}", fg=typer.colors.RED,
                    err=True)
        if created is not None:  # leave nothing behind that this attempt made
            try:
                remove_made(settings.state_dir, created)
            except OSError as cleanup:
                logger.warning("could not remove %s: %s", settings.state_dir, cleanup)
        raise typer.Exit(2) from exc
    typer.echo(f"{settings.device_id}: connecting to {settings.mqtt.host}:{settings.mqtt.port}")

    def say_connected() -> None:
        if agent.session.connected.wait(3600):
            typer.echo(f"{settings.device_id}: connected")

    threading.Thread(target=say_connected, name="say-connected", daemon=True).start()
    agent.run_forever(_stop_on_signals())
    typer.echo(f"{settings.device_id}: stopped")


@fleet_app.callback()
def fleet(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Number of agents")] = 10,
    broker: Annotated[str | None, typer.Option(
        help="HOST:PORT of the broker [from --config, else 127.0.0.1:1883]")] = None,
    secrets_dir: Annotated[Path | None, typer.Option(
        help="Folder of {id}.password files (the broker's secrets folder)")] = None,
    tls_dir: Annotated[Path | None, typer.Option(
        help="mTLS instead of passwords: the broker's pki folder (ca.crt, clients/{id}.crt "
        "and .key from `edgefl broker add-device --tls`); point --broker at its TLS "
        "listener")] = None,
    prefix: Annotated[str, typer.Option(help="Device ids are {prefix}{i:03d}")] = "sim-",
    first_index: Annotated[int, typer.Option(min=0, help="Index of the first device")] = 0,
    state_dir: Annotated[Path, typer.Option(help="One sub-folder per device")] = Path("var/fleet"),
    interval: Annotated[float | None, typer.Option(
        help="Telemetry interval, s [from --config, else 10]")] = None,
    protocol: Annotated[int, typer.Option(help="5 (MQTT 5) or 4 (3.1.1)")] = 5,
    topic_root: Annotated[str, typer.Option(help="Topic root")] = DEFAULT_ROOT,
    per_process: Annotated[int, typer.Option(
        min=1, max=MAX_AGENTS_PER_PROCESS, help="Agents per process")] = MAX_AGENTS_PER_PROCESS,
    config: Annotated[Path | None, typer.Option(
        help="Settings file every agent starts from (TOML/YAML)")] = None,
    fl_task: Annotated[list[str] | None, typer.Option(
        help="Every agent joins a federated task: NAME=package.module:Class (repeatable); "
        "device i holds partition i of the fleet")] = None,
    partitions: Annotated[int | None, typer.Option(
        min=1, help="Partitions of the task data [the fleet's size]")] = None,
    serve: Annotated[str | None, typer.Option(
        help="Simulated applications send requests to a model: MODEL=package.module:Class "
        "(examples and labels from the task's test split; labelled feedback)")] = None,
    serve_rate: Annotated[float, typer.Option(
        min=0.01, max=1000.0, help="Requests per second per device, with --serve")] = 2.0,
    profile: Annotated[Path | None, typer.Option(
        help="Heterogeneity profile (YAML/TOML): slow devices, availability schedules, "
        "failures, all from its seed")] = None,
    profile_fleet: Annotated[str | None, typer.Option(
        hidden=True, help="FIRST:COUNT of the whole fleet the profile is drawn over")] = None,
) -> None:
    """Run N agents until Ctrl-C (in several processes when N > --per-process)."""
    try:
        tasks = parse_fl_tasks(fl_task)
        base = EdgeSettings.load(config, device_id="fleet-template") if config else None
        traffic = _traffic(serve, serve_rate) if serve else None
        first, count = (map(int, profile_fleet.split(":")) if profile_fleet
                        else (first_index, devices))
        profiles = device_profiles(
            HeterogeneityProfile.model_validate(read_config_file(profile)),
            [f"{prefix}{i:03d}" for i in range(first, first + count)]) if profile else None
    except (SchemaError, ValueError, ImportError, AttributeError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    if secrets_dir is not None:
        missing = missing_passwords(devices, prefix=prefix, first_index=first_index,
                                    secrets_dir=secrets_dir)
        if missing:
            last = f"{prefix}{first_index + devices - 1:03d}"
            typer.secho(f"error: {len(missing)} of {devices} devices have no password in "
                        f"{secrets_dir} (first: {missing[0]}); provision them: edgefl broker "
                        f"add-device --range {prefix}{first_index:03d}..{last}",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    if tls_dir is not None:
        ids = [f"{prefix}{i:03d}" for i in range(first_index, first_index + devices)]
        no_cert = [d for d in ids if not (tls_dir / "clients" / f"{d}.crt").exists()]
        if no_cert or not (tls_dir / "ca.crt").exists():
            typer.secho(f"error: {len(no_cert)} of {devices} devices have no certificate in "
                        f"{tls_dir / 'clients'} (first: {(no_cert or ['ca.crt'])[0]}); "
                        f"provision them: edgefl broker add-device --tls --range "
                        f"{ids[0]}..{ids[-1]}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    stop = _stop_on_signals()
    if devices > per_process:
        _run_processes(devices, per_process, first_index, stop, [
            *(["--broker", broker] if broker else []),
            "--prefix", prefix, "--state-dir", str(state_dir),
            *(["--interval", str(interval)] if interval is not None else []),
            "--protocol", str(protocol),
            "--topic-root", topic_root,
            "--partitions", str(partitions or first_index + devices),
            *(["--secrets-dir", str(secrets_dir)] if secrets_dir else []),
            *(["--tls-dir", str(tls_dir)] if tls_dir else []),
            *(["--profile", str(profile), "--profile-fleet", f"{first_index}:{devices}"]
              if profile else []),
            *(["--config", str(config)] if config else []),
            *[x for item in (fl_task or []) for x in ("--fl-task", item)],
            *(["--serve", serve, "--serve-rate", str(serve_rate)] if serve else []),
        ])
        return
    mqtt = base.mqtt if base else EdgeSettings(device_id="fleet-template").mqtt
    if broker:
        host, port = parse_broker(broker)
        mqtt = mqtt.model_copy(update={"host": host, "port": port})
    mqtt = mqtt.model_copy(update={"protocol": 5 if protocol == 5 else 4})
    host, port = mqtt.host, mqtt.port
    settings = fleet_settings(devices, prefix=prefix, state_root=state_dir, mqtt=mqtt,
                              secrets_dir=secrets_dir, interval_s=interval,
                              first_index=first_index, topic_root=topic_root, base=base,
                              fl_tasks=tasks, partitions=partitions, tls_dir=tls_dir,
                              profiles=profiles)
    sim = Fleet(settings, state_dir, traffic, profiles)
    sim.start()
    connected = sim.wait_connected(60)
    typer.echo(f"{connected}/{devices} agents connected to {host}:{port}; Ctrl-C stops them")
    stop.wait()
    sim.stop()
    typer.echo("fleet stopped")


def _traffic(serve: str, rate: float) -> Traffic:
    """``MODEL=package.module:Class`` -> requests from the task's test split.

    Raises:
        ValueError: not of that form, the task cannot be loaded or has no test split.
        ImportError, AttributeError: the task's module or class does not exist.
    """
    model, sep, path = serve.partition("=")
    if not sep or not model or ":" not in path:
        raise ValueError(f"--serve {serve!r}: expected MODEL=package.module:Class")
    from fl_tasks.base import load_task  # torch only where a fleet serves
    from fl_tasks.errors import TaskError

    try:
        data = load_task(path).central_data()
    except TaskError as exc:
        raise ValueError(f"--serve {serve!r}: {exc}") from None
    if data is None or not len(data[1]):
        raise ValueError(f"--serve: the task {path} has no test split to send")
    return Traffic(validate_id(model, "model name"), data[0], data[1], rate)


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
