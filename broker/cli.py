"""``edgefl broker``: run Mosquitto with edgefl's config, and manage its identities."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.config import OBSERVER_TOPICS, render_acl, render_config
from broker.errors import BrokerError
from broker.launcher import MosquittoProcess
from broker.provision import (
    LAUNCHER_PID,
    add_identities,
    add_identity,
    add_observer,
    init_broker,
    parse_id_range,
    reload_running_broker,
    remove_identity,
    restart_running_broker,
    write_config_files,
)
from broker.settings import BrokerSettings
from schemas.errors import SchemaError

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="broker",
    help="Run the fleet's Mosquitto (generated config, ACL, passwords, optional mTLS).",
    invoke_without_command=True,
    no_args_is_help=False,
)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Broker data folder [env EDGEFL_BROKER_DATA_DIR]"),
]


def _settings(data_dir: Path | None, **overrides: Any) -> BrokerSettings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    base = BrokerSettings()
    if "tls" in values:
        values["tls"] = base.tls.model_copy(update=values["tls"])
    return base.model_copy(update=values)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _announce(settings: BrokerSettings, pid: int | None) -> None:
    typer.echo(f"mosquitto pid {pid}: devices on {settings.host}:{settings.port}, "
               f"services (cloud) on {settings.service_host}:{settings.service_port}, "
               f"observers on {settings.observer_host}:{settings.observer_port}; "
               "Ctrl-C stops it")
    if settings.tls.enabled:
        typer.echo(f"mTLS: devices on {settings.tls.host}:{settings.tls.port}, services "
                   f"(cloud) on {settings.tls.host}:{settings.tls.service_port}")


@app.callback()
def run(
    ctx: typer.Context,
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option(help="Device listener port [1883]")] = None,
    host: Annotated[str | None, typer.Option(help="Device listener address [127.0.0.1]")] = None,
    service_port: Annotated[int | None, typer.Option(
        help="Service listener port, for the cloud [1884]")] = None,
    observer_port: Annotated[int | None, typer.Option(
        help="Observer listener port, read-only identities [1885]")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Also open the mTLS listener")] = False,
    tls_port: Annotated[int | None, typer.Option(help="TLS listener port [8883]")] = None,
    tls_service_port: Annotated[int | None, typer.Option(
        help="TLS service listener port, for the cloud's certificate [8884]")] = None,
) -> None:
    """Start Mosquitto in the foreground until Ctrl-C (runs `init` first when needed)."""
    if ctx.invoked_subcommand is not None:
        return
    tls_update: dict[str, Any] = {"enabled": True} if tls else {}
    if tls_port is not None:
        tls_update["port"] = tls_port
    if tls_service_port is not None:
        tls_update["service_port"] = tls_service_port
    settings = _settings(data_dir, port=port, host=host, tls=tls_update or None,
                         service_port=service_port, observer_port=observer_port)
    try:
        cloud = init_broker(settings)
        config = write_config_files(settings)
        process = MosquittoProcess(
            config, settings.host, settings.port,
            pid_file=settings.layout.root / "mosquitto.pid", stdout=None,
        )
        typer.echo(f"config: {config}")
        typer.echo(f"cloud identity: {cloud.username} (password in {cloud.password_file})")
        process.start()
    except BrokerError as exc:
        raise _fail(exc) from exc
    _announce(settings, process.pid)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    restart = threading.Event()

    def _restart(signum: int, frame: object) -> None:  # remove-device revoked a certificate
        restart.set()

    # SIGINT explicitly too: a launcher started from a background job or a service
    # manager may inherit SIGINT ignored, and Ctrl-C must still stop it.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGUSR1, _restart)
    launcher_pid = settings.layout.root / LAUNCHER_PID
    launcher_pid.write_text(f"{os.getpid()}\n")
    try:
        while True:
            while process.running and not restart.wait(0.5):
                pass
            if not restart.is_set():
                code = process.wait()
                break
            restart.clear()
            process.stop()
            process.start()
            typer.echo(f"mosquitto restarted (pid {process.pid}) to load the CRL")
    except KeyboardInterrupt:
        code = process.stop() or 0
        typer.echo("mosquitto stopped")
        raise typer.Exit(0) from None
    except BrokerError as exc:
        raise _fail(exc) from exc
    finally:
        launcher_pid.unlink(missing_ok=True)
    raise typer.Exit(code)


@app.command("init")
def init_cmd(
    data_dir: DataDir = None,
    tls: Annotated[bool, typer.Option("--tls", help="Create a dev CA and server cert")] = False,
) -> None:
    """Create the data folder: config, ACL, cloud identity (and CA with --tls)."""
    settings = _settings(data_dir, tls={"enabled": True} if tls else None)
    try:
        cloud = init_broker(settings)
    except BrokerError as exc:
        raise _fail(exc) from exc
    typer.echo(f"initialised {settings.layout.root}")
    typer.echo(f"cloud identity {cloud.username}: password in {cloud.password_file}")
    if cloud.cert:
        typer.echo(f"cloud certificate {cloud.cert.cert} (services CA "
                   f"{settings.layout.service_pki / 'ca.crt'})")


@app.command("add-device")
def add_device_cmd(
    device_id: Annotated[str | None, typer.Argument(help="Device id = MQTT username")] = None,
    data_dir: DataDir = None,
    id_range: Annotated[str | None, typer.Option(
        "--range", help="Many devices at once, e.g. sim-000..sim-099")] = None,
    from_file: Annotated[Path | None, typer.Option(
        help="Many devices at once: a file with one device id per line")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Also issue client certificates")] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
) -> None:
    """Provision devices: password entries (secrets written to 0600 files), optional certs.

    One id, a ``--range`` or a ``--from-file``; the running broker is reloaded once.
    Passwords are never printed or passed as arguments.
    """
    settings = _settings(data_dir)
    if sum(x is not None for x in (device_id, id_range, from_file)) != 1:
        typer.secho("error: give one device id, --range A..B or --from-file FILE",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        if device_id is not None:
            password = sys.stdin.readline().rstrip("\n") if password_stdin else None
            identity = add_identity(settings, device_id, password=password, tls=tls)
            typer.echo(f"device {device_id}: password in {identity.password_file}")
            if identity.identity_key:
                typer.echo(f"device {device_id}: identity key {identity.identity_key.key}, "
                           f"certificate {identity.identity_key.certificate}")
            if identity.cert:
                typer.echo(f"device {device_id}: certificate {identity.cert.cert}, "
                           f"key {identity.cert.key}")
        else:
            if id_range is not None:
                ids = parse_id_range(id_range)
            else:
                assert from_file is not None  # noqa: S101 - one of the three
                ids = [line.strip() for line in from_file.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
            identities = add_identities(settings, ids, tls=tls)
            typer.echo(f"{len(identities)} device(s): passwords in {settings.layout.secrets}")
    except (BrokerError, SchemaError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    if reload_running_broker(settings):
        typer.echo("running broker reloaded")


@app.command("add-observer")
def add_observer_cmd(
    name: Annotated[str, typer.Argument(help="Observer name = MQTT username")],
    data_dir: DataDir = None,
    topics: Annotated[str, typer.Option(
        help=f"Topic groups it reads, among {','.join(OBSERVER_TOPICS)}")] =
    "telemetry,state,metrics,status,alerts",
) -> None:
    """A read-only identity for Telegraf, Node-RED or a SCADA (observer listener, 1885).

    It reads the topic groups given and writes nothing; its password goes to a
    0600 file. The running broker is reloaded.
    """
    settings = _settings(data_dir)
    groups = [g.strip() for g in topics.split(",") if g.strip()]
    try:
        identity = add_observer(settings, name, groups)
    except (BrokerError, SchemaError, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"observer {name} reads {', '.join(sorted(set(groups)))} on port "
               f"{settings.observer_port}: password in {identity.password_file}")
    if reload_running_broker(settings):
        typer.echo("running broker reloaded")


@app.command("remove-device")
def remove_device_cmd(device_id: str, data_dir: DataDir = None) -> None:
    """Remove a device's password entry, revoke its certificate (CRL), delete its files.

    A connected device is disconnected: the broker reloads its passwords (SIGHUP),
    and, when a certificate was revoked, restarts (a SIGHUP makes Mosquitto 2.0
    refuse new connections with it but leaves an open TLS session connected).
    """
    settings = _settings(data_dir)
    had_cert = (settings.layout.pki / "clients" / f"{device_id}.crt").exists()
    existed = remove_identity(settings, device_id)
    typer.echo(f"device {device_id}: {'removed' if existed else 'was not provisioned'}"
               + ("; certificate revoked" if had_cert else ""))
    if had_cert:
        if restart_running_broker(settings):
            typer.echo("running broker restarting to load the CRL and close its session")
        elif reload_running_broker(settings):
            typer.echo("running broker reloaded (the CRL refuses new connections); restart "
                       "it to close an open session of the device")
        else:
            typer.echo("restart the broker to load the CRL")
    elif reload_running_broker(settings):
        typer.echo("running broker reloaded")


@app.command("show-config")
def show_config_cmd(
    data_dir: DataDir = None,
    acl: Annotated[bool, typer.Option("--acl", help="Print the ACL instead")] = False,
) -> None:
    """Print the rendered mosquitto.conf (or ACL) for the current settings."""
    settings = _settings(data_dir)
    if acl:
        typer.echo(render_acl(settings.topic_root, settings.cloud_username), nl=False)
    else:
        typer.echo(render_config(settings), nl=False)
