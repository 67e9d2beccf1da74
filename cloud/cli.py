"""The ``edgefl`` command line.

Sub-command groups of other packages (``edgefl broker``, later ``edgefl node``)
are registered as entry points in the ``edgefl.commands`` group and loaded at
run time, so this module never imports the edge agent.
"""

from __future__ import annotations

import json
import logging
import platform
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="edgefl",
    help="edgefl: MQTT event-driven edge AI and federated learning for device fleets.",
    no_args_is_help=True,
    add_completion=False,
)

class BrokerChoice(StrEnum):
    """Which local broker the demo starts."""

    AUTO = "auto"
    MOSQUITTO = "mosquitto"
    AMQTT = "amqtt"


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@app.callback()
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


@app.command("version")
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


@app.command("demo")
def demo_cmd(
    devices: Annotated[int, typer.Option(min=2, max=100, help="Simulated devices")] = 10,
    rounds: Annotated[int, typer.Option(min=1, max=200, help="Federated rounds")] = 15,
    reports: Annotated[int, typer.Option(min=1, max=1000, help="Telemetry per device")] = 5,
    data_dir: Annotated[Path | None, typer.Option(help="Keep broker data here")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write a JSON summary")] = None,
    broker: Annotated[
        BrokerChoice, typer.Option(help="auto: Mosquitto when installed, else embedded amqtt")
    ] = BrokerChoice.AUTO,
) -> None:
    """Run the demo on a local broker (Mosquitto, or the embedded one) and exit."""
    from cloud.demo import run_demo

    summary = run_demo(devices=devices, reports=reports, rounds=rounds, data_dir=data_dir,
                       json_path=json_path,
                       broker_kind=broker.value)
    raise typer.Exit(0 if summary.ok else 1)


def _register_plugins() -> None:
    for ep in entry_points(group="edgefl.commands"):
        sub = ep.load()
        app.add_typer(sub, name=ep.name)


def main() -> None:
    """Console-script entry point."""
    from cloud.cloud_cli import register

    register(app)
    _register_plugins()
    app()


if __name__ == "__main__":
    main()
