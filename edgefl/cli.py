"""The ``edgefl`` command line: a small root that loads each command group when used.

Groups are entry points (``edgefl.commands``): a Typer app is added as a group, a
function as a command. Only the group the command line names is imported, so
``edgefl node`` on a device never imports the cloud (nor its dependencies), and a
group whose extra is not installed says which one to install, in one line.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from enum import StrEnum
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
EXTRAS = {"cloud": "cloud", "edge_node": "edge", "edgefl": "cloud,edge"}
"""Top-level package of a command group -> the extra that installs its dependencies."""


class BrokerChoice(StrEnum):
    """Which local broker the demo starts."""

    AUTO = "auto"
    MOSQUITTO = "mosquitto"
    AMQTT = "amqtt"


def main_options(
    log_level: Annotated[str, typer.Option(help="Logging level")] = "WARNING",
) -> None:
    """Options for every command."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Print edgefl's version, the wire-contract version and what is installed."""
    from broker.launcher import mosquitto_version
    from schemas.base import SCHEMA_VERSION
    from schemas.topics import DEFAULT_ROOT

    info: dict[str, str | int | None] = {
        "edgefl": _version_of("edgefl"),
        "schema_version": SCHEMA_VERSION,
        "topic_root": DEFAULT_ROOT,
        "python": platform.python_version(),
        "mosquitto": mosquitto_version(),
    }
    for package in ("paho-mqtt", "aiomqtt", "pydantic", "safetensors", "onnxruntime",
                    "ai-edge-litert", "tflite-runtime", "torch", "influxdb-client"):
        info[package] = _version_of(package)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:16} {value if value is not None else '-'}")


def demo_cmd(
    devices: Annotated[int, typer.Option(min=2, max=100, help="Simulated devices")] = 10,
    rounds: Annotated[int, typer.Option(min=1, max=200, help="Federated rounds")] = 15,
    reports: Annotated[int, typer.Option(min=1, max=1000, help="Telemetry per device")] = 5,
    data_dir: Annotated[Path | None, typer.Option(help="Keep broker data here")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write a JSON summary")] = None,
    plot_dir: Annotated[Path | None, typer.Option(
        "--plot", help="Write PNG charts (training, bytes, fleet accuracy, the alert) here")
    ] = None,
    broker: Annotated[
        BrokerChoice, typer.Option(help="auto: Mosquitto when installed, else embedded amqtt")
    ] = BrokerChoice.AUTO,
    tls: Annotated[bool, typer.Option(
        "--tls", help="Every client connects with a certificate (mTLS); needs Mosquitto")
    ] = False,
) -> None:
    """Run the demo on a local broker (Mosquitto, or the embedded one) and exit."""
    from broker.errors import BrokerError
    from edgefl.demo import run_demo

    try:
        summary = run_demo(devices=devices, reports=reports, rounds=rounds,
                           data_dir=data_dir, json_path=json_path, plot_dir=plot_dir,
                           broker_kind=broker.value, tls=tls)
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(0 if summary.ok else 1)


def command_groups() -> dict[str, EntryPoint]:
    """Command name -> its entry point."""
    return {ep.name: ep for ep in entry_points(group="edgefl.commands")}


def _add(app: typer.Typer, name: str, entry: EntryPoint) -> None:
    target = entry.load()
    if isinstance(target, typer.Typer):
        app.add_typer(target, name=name)
    else:
        app.command(name)(target)


def build_app(requested: str | None = None) -> typer.Typer:
    """The root app with the group ``requested`` (or, for help, every group available)."""
    app = typer.Typer(
        name="edgefl",
        help="edgefl: MQTT event-driven edge AI and federated learning for device fleets.",
        no_args_is_help=True, add_completion=False,
    )
    app.callback()(main_options)
    app.command("version")(version_cmd)
    app.command("demo")(demo_cmd)
    groups = command_groups()
    if requested in groups:
        try:
            _add(app, requested, groups[requested])
        except ImportError as exc:
            extra = EXTRAS.get(groups[requested].value.split(".", 1)[0], "cloud")
            typer.secho(f"error: `edgefl {requested}` needs the {extra} extra "
                        f"(pip install 'edgefl[{extra}]'): {exc}", fg=typer.colors.RED,
                        err=True)
            raise SystemExit(2) from None
        return app
    for name, entry in sorted(groups.items()):
        try:
            _add(app, name, entry)
        except ImportError as exc:  # that extra is not installed here: not offered
            logger.debug("command %s unavailable: %s", name, exc)
    return app


def requested_command(argv: list[str]) -> str | None:
    """The first word of the command line that is not a root option."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--log-level":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def main() -> None:
    """Console-script entry point."""
    build_app(requested_command(sys.argv[1:]))(prog_name="edgefl")


if __name__ == "__main__":
    main()
