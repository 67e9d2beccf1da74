"""``edgefl cloud``, ``edgefl devices``, ``edgefl alerts``, ``edgefl report``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cloud.cmd_cli import cmd
from cloud.errors import CloudError
from cloud.fl.config import FLTaskConfig
from cloud.reports import device_report
from cloud.settings import CloudSettings
from cloud.storage.sqlite_store import SqliteStore
from fl_tasks.errors import TaskError
from schemas.base import now
from schemas.errors import SchemaError
from schemas.settings_files import (
    ConfigFileError,
    first_missing,
    read_config_file,
    remove_made,
)
from schemas.topics import validate_id

logger = logging.getLogger(__name__)

DataDir = Annotated[Path | None, typer.Option(help="Cloud data folder [var/cloud]")]
Config = Annotated[Path | None, typer.Option(help="TOML/YAML settings file")]


def _settings(config: Path | None, **explicit: Any) -> CloudSettings:
    try:
        return CloudSettings.load(config, **explicit)
    except (SchemaError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


def _store(config: Path | None, data_dir: Path | None) -> SqliteStore:
    settings = _settings(config, data_dir=data_dir)
    if not settings.sqlite_path.exists():
        typer.secho(f"error: no cloud store at {settings.sqlite_path}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    return SqliteStore(settings.sqlite_path)


fl_app = typer.Typer(name="fl", help="Federated learning tasks.", no_args_is_help=True)


cloud_app = typer.Typer(name="cloud", invoke_without_command=True,
                        help="Run the cloud service; `edgefl cloud status` shows its health.")


def fl_start(
    task: Annotated[str | None, typer.Option(
        help="Task import path, package.module:Class [fl_tasks.digits:DigitsTask]")] = None,
    name: Annotated[str, typer.Option(help="Task name (topic level)")] = "digits",
    rounds: Annotated[int | None, typer.Option(min=1, help="Rounds [10]")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="fedavg, fedadam, fedprox, krum, ... [fedavg]")] = None,
    min_clients: Annotated[int | None, typer.Option(
        help="min_fit_clients = min_available_clients [2]")] = None,
    local_epochs: Annotated[int | None, typer.Option(
        min=1, help="Local epochs per round on each device [1]")] = None,
    learning_rate: Annotated[float | None, typer.Option(
        min=0.0, help="Devices' SGD learning rate [0.01]")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Devices' batch size [32]")] = None,
    task_file: Annotated[Path | None, typer.Option(
        help="The task's settings (YAML/TOML/JSON, the keys of a settings file's "
        "fl.<name> section, privacy included); options given here override them")] = None,
    config: Config = None,
    data_dir: DataDir = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Return once the service started the task")] = False,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the running service to pick the task up")] = 30.0,
) -> None:
    """Hand a federated task to the running cloud service, then follow it to its end.

    The task's settings come from the settings file's ``fl.<name>`` section when
    it has one; options given here override them. The task is checked here (its
    settings, import path and strategy) and the service that owns the data folder
    starts it. Prints a summary; exits 1 when the task failed (or no service took it).
    """
    from cloud.fl.errors import StrategyError
    from cloud.fl.privacy import DPMean
    from cloud.fl.registry import make_strategy
    from cloud.fl.submissions import Submissions
    from fl_tasks.base import load_task
    from fl_tasks.errors import TaskError

    base = _settings(config, data_dir=data_dir)
    values: dict[str, Any] = (base.fl[name].model_dump() if name in base.fl
                              else {"task": "fl_tasks.digits:DigitsTask", "rounds": 10,
                                    "strategy": "fedavg", "min_fit_clients": 2,
                                    "min_available_clients": 2})
    if task_file is not None:
        try:
            values |= read_config_file(task_file)
        except ConfigFileError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    explicit = {"task": task, "rounds": rounds, "strategy": strategy,
                "min_fit_clients": min_clients, "min_available_clients": min_clients}
    values |= {k: v for k, v in explicit.items() if v is not None}
    hyperparams = {"local_epochs": local_epochs, "learning_rate": learning_rate,
                   "batch_size": batch_size}
    values["hyperparams"] = {**(values.get("hyperparams") or {}),
                             **{k: v for k, v in hyperparams.items() if v is not None}}
    try:
        validate_id(name, "task name")
        task_config = FLTaskConfig.model_validate(values)
        load_task(task_config.task, **task_config.task_kwargs)
        strategy_made = make_strategy(task_config.strategy, task_config.strategy_params)
        if task_config.privacy is not None:
            DPMean(strategy_made, task_config.privacy.mode)  # refuses a robust strategy
    except (SchemaError, ValueError, TaskError, StrategyError, ImportError, AttributeError,
            TypeError) as exc:
        typer.secho(f"error: {' '.join(str(exc).split())[:400]}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2) from None
    store = _store(config, data_dir)
    submissions = Submissions(store)
    request_id = submissions.request(name, task_config)
    deadline = time.monotonic() + wait
    pause = threading.Event()
    while (request := submissions.get(request_id)) is not None and request.state == "pending":
        if time.monotonic() > deadline:
            submissions.withdraw(request_id)
            typer.secho(f"error: no cloud service picked the task up within {wait:.0f} s: is "
                        f"`edgefl cloud` running with {store.path.parent}?",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        pause.wait(0.2)
    if request is None or request.state != "started":
        typer.secho(f"error: the service refused the task: {request.detail if request else ''}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"task {name} started by the cloud service")
    if detach:
        return
    state = _follow(store, name)
    print_task_summary(name, state, _history(store.path, name))
    if state.get("state") != "finished":
        raise typer.Exit(1)


def _follow(store: SqliteStore, name: str) -> dict[str, Any]:
    """Print each round as it is released, until the task ends; its final state."""
    pause = threading.Event()
    shown = 0
    while True:
        state: dict[str, Any] = store.get(f"fl:{name}") or {}
        if state.get("round", 0) > shown:
            shown = state["round"]
            last = state.get("last") or {}
            accuracy = last.get("central_accuracy") or last.get("eval_accuracy")
            staleness = last.get("staleness_mean")
            typer.echo(("version" if "fedbuff" in state else "round")
                       + f" {shown}: {last.get('updates', len(last.get('participants', [])))}"
                       " update(s)"
                       + (f", staleness {staleness:.2f}" if staleness is not None else "")
                       + (f", accuracy {accuracy:.4f}" if accuracy is not None else ""))
        if state.get("state") in ("finished", "failed"):
            return state
        pause.wait(0.5)


def _history(path: Path, name: str) -> list[dict[str, Any]]:
    store = SqliteStore(path)
    try:
        return [json.loads(r["status"]) for r in store.query(
            "SELECT status FROM fl_rounds WHERE task=? ORDER BY round, ts", (name,))]
    finally:
        store.close()


def print_task_summary(name: str, state: dict[str, Any], history: list[dict[str, Any]],
                       ) -> None:
    """One line for the task, then a table of its released rounds."""
    console = Console()
    console.print(f"task {name}: {state.get('state', 'unknown')}, round {state.get('round', 0)}"
                  f", global version {state.get('global_version', '-')}"
                  + (f" ({state['message']})" if state.get("message") else ""))
    private = any(h.get("epsilon_spent") is not None for h in history)
    table = Table(title="rounds")
    for column in ("round", "participants", "rejected", "train loss", "central acc",
                   "eval acc", "bytes", "s", *(["epsilon"] if private else [])):
        table.add_column(column)

    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for h in history:
        table.add_row(str(h["round"]), str(len(h.get("participants", []))),
                      str(sum(h.get("rejected_counts", {}).values())),
                      f(h.get("train_loss")), f(h.get("central_accuracy")),
                      f(h.get("eval_accuracy")), str(h.get("bytes_received", 0)),
                      f"{h.get('duration_s') or 0:.1f}",
                      *([f(h.get("epsilon_spent"))] if private else []))
    console.print(table)
    if private and history:
        console.print(f"privacy: epsilon {history[-1]['epsilon_spent']:.4f} spent")


def fl_status(
    name: Annotated[str, typer.Argument(help="Task name")],
    config: Config = None, data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Progress of a federated task, from the cloud's store."""
    store = _store(config, data_dir)
    state = store.get(f"fl:{name}")
    if state is None:
        typer.secho(f"error: no task {name!r} in this store", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    history = _history(store.path, name)
    if as_json:
        typer.echo(json.dumps({**state, "history": history}, indent=2))
        return
    print_task_summary(name, state, history)


def cloud_main(
    ctx: typer.Context,
    broker: Annotated[str | None, typer.Option(help="HOST:PORT of the broker")] = None,
    config: Config = None,
    data_dir: DataDir = None,
    instance: Annotated[str | None, typer.Option(help="Instance name")] = None,
    password_file: Annotated[Path | None, typer.Option(help="Cloud MQTT password file")] = None,
    shared_group: Annotated[str | None, typer.Option(
        help="Split ingest with other instances (MQTT 5 shared subscriptions)")] = None,
    rules: Annotated[Path | None, typer.Option(help="Alert rules YAML")] = None,
    topic_root: Annotated[str | None, typer.Option(help="Topic root")] = None,
) -> None:
    """Run the cloud service until Ctrl-C/SIGTERM (a second one exits at once)."""
    if ctx.invoked_subcommand is not None:
        ctx.ensure_object(dict)["config"] = config
        ctx.obj["data_dir"] = data_dir
        return
    cloud(broker=broker, config=config, data_dir=data_dir, instance=instance,
          password_file=password_file, shared_group=shared_group, rules=rules,
          topic_root=topic_root)


def cloud_status(
    ctx: typer.Context,
    config: Config = None, data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The service's counters: accepted, stored, refused by kind and reason, queues."""
    parent = ctx.obj or {}
    store = _store(config or parent.get("config"), data_dir or parent.get("data_dir"))
    rows = store.query("SELECT instance, health FROM cloud_health ORDER BY ts DESC LIMIT 1")
    if not rows:
        typer.secho("error: this store has no health record yet (is the service running?)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    health = json.loads(rows[0]["health"])
    if as_json:
        typer.echo(json.dumps(health, indent=2))
        return
    console = Console()
    at = dt.datetime.fromtimestamp(health["ts"], dt.UTC)
    link = "connected" if health["connected"] else "NOT connected"
    console.print(f"cloud {health['instance']}: {link}, as of {at:%Y-%m-%d %H:%M:%S} UTC")
    table = Table(title="messages by topic kind")
    for column in ("kind", "accepted", "stored", "duplicates", "rate limited", "refused"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    kinds = sorted({*health["accepted"], *health["stored"], *health["refused"],
                    *health["rate_limited"], *health["duplicates"]})
    for kind in kinds:
        refused = health["refused"].get(kind, {})
        table.add_row(kind, str(health["accepted"].get(kind, 0)),
                      str(health["stored"].get(kind, 0)),
                      str(health["duplicates"].get(kind, 0)),
                      str(health["rate_limited"].get(kind, 0)),
                      ", ".join(f"{r}={n}" for r, n in sorted(refused.items())) or "0")
    console.print(table)
    errors = {k: v for k, v in health["errors"].items() if v}
    console.print("errors: " + (", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
                                or "none"))
    console.print("queues: " + ", ".join(f"{k}={v}" for k, v in sorted(health["queues"].items())))


def cloud(
    broker: Annotated[str | None, typer.Option(help="HOST:PORT of the broker")] = None,
    config: Config = None,
    data_dir: DataDir = None,
    instance: Annotated[str | None, typer.Option(help="Instance name")] = None,
    password_file: Annotated[Path | None, typer.Option(help="Cloud MQTT password file")] = None,
    shared_group: Annotated[str | None, typer.Option(
        help="Split ingest with other instances (MQTT 5 shared subscriptions)")] = None,
    rules: Annotated[Path | None, typer.Option(help="Alert rules YAML")] = None,
    topic_root: Annotated[str | None, typer.Option(help="Topic root")] = None,
) -> CloudSettings:
    """Run the cloud service until Ctrl-C/SIGTERM (a second one exits at once)."""
    from cloud.service import CloudService

    mqtt: dict[str, Any] = {}
    if broker:
        host, _, port = broker.rpartition(":") if ":" in broker else (broker, "", "1883")
        mqtt |= {"host": host, "port": int(port)}
    if password_file:
        mqtt["password_file"] = password_file
    if shared_group:
        mqtt["shared_group"] = shared_group
    settings = _settings(config, data_dir=data_dir, instance=instance, topic_root=topic_root,
                         mqtt=mqtt or None, alerts={"rules_file": rules} if rules else None)
    password = settings.mqtt.password_file
    if password is not None and not password.is_file():
        typer.secho(f"error: no password file {password} (`edgefl broker init` writes the "
                    "cloud's)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    created = first_missing(settings.data_dir)
    try:
        service = CloudService(settings)
    except (SchemaError, ValueError, OSError, ImportError, TaskError, CloudError) as exc:
        typer.secho(f"error: {' '.join(str(exc).split())[:400]}", fg=typer.colors.RED,
                    err=True)
        if created is not None:  # leave nothing behind that this attempt made
            try:
                remove_made(settings.data_dir, created)
            except OSError as cleanup:
                logger.warning("could not remove %s: %s", settings.data_dir, cleanup)
        raise typer.Exit(2) from exc

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                # Nothing unacknowledged is lost: the broker delivers it again.
                logger.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info("%s: stopping (send it again to exit at once)",
                        signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await service.run(stop)

    typer.echo(f"cloud {settings.instance}: {settings.mqtt.host}:{settings.mqtt.port}, "
               f"store {settings.sqlite_path}")
    asyncio.run(main())
    typer.echo("cloud stopped")
    return settings


def devices(config: Config = None, data_dir: DataDir = None,
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The fleet as the cloud knows it."""
    from cloud.registry import DeviceRegistry

    registry = DeviceRegistry(_store(config, data_dir))
    records = registry.devices()
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in records], indent=2))
        return
    table = Table(title=f"{len(records)} devices, {sum(r.online for r in records)} online")
    for column in ("device", "state", "last seen (UTC)", "site", "hardware", "runtimes", "models"):
        table.add_column(column)
    for r in records:
        seen = dt.datetime.fromtimestamp(r.last_seen, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") \
            if r.last_seen else "-"
        table.add_row(r.device_id, "[green]online[/]" if r.online else "[red]offline[/]", seen,
                      r.site or "-", f"{r.machine or '?'} {r.cpu_count or '?'} cpu "
                      f"{(r.memory_total_mb or 0):.0f} MiB", ", ".join(sorted(r.runtimes)),
                      ", ".join(f"{m}={v}" for m, v in sorted(r.models.items())) or "-")
    Console().print(table)


def alerts(
    config: Config = None, data_dir: DataDir = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include resolved alerts")] = False,
    ack: Annotated[tuple[str, str] | None, typer.Option(
        help="Acknowledge DEVICE RULE (applied by the running service)")] = None,
    by: Annotated[str, typer.Option(help="Who acknowledges")] = "operator",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Active (and with --all, recent) alerts; --ack DEVICE RULE acknowledges one."""
    store = _store(config, data_dir)
    if ack is not None:
        with store.transaction() as db:
            db.execute("INSERT INTO alert_acks(device_id, rule, by, requested_at) "
                       "VALUES (?,?,?,?)", (ack[0], ack[1], by, now()))
        typer.echo(f"acknowledgement of {ack[0]}/{ack[1]} queued for the cloud service")
        return
    where = "" if show_all else "WHERE resolved=0"
    rows = [dict(r) for r in store.query(
        f"SELECT * FROM alerts {where} ORDER BY opened_at DESC LIMIT 200")]  # noqa: S608
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} alert(s)")
    for column in ("device", "rule", "severity", "opened", "resolved", "ack", "message"):
        table.add_column(column)
    for r in rows:
        opened = dt.datetime.fromtimestamp(r["opened_at"], dt.UTC).strftime("%m-%d %H:%M:%S")
        table.add_row(r["device_id"], r["rule"], r["severity"], opened,
                      "yes" if r["resolved"] else "no", r["acknowledged_by"] or "-",
                      r["message"] or "")
    Console().print(table)


def parse_time(text: str) -> float:
    """ISO 8601, Unix seconds, or a duration ago like ``24h``, ``30m``, ``7d``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now() - float(match.group(1)) * scale
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use ISO 8601, Unix seconds or e.g. 24h") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def report(
    device_id: Annotated[str, typer.Argument(help="Device id")],
    since: Annotated[str, typer.Option(help="Start: ISO 8601, Unix s, or 24h ago")] = "24h",
    until: Annotated[str | None, typer.Option(help="End [now]")] = None,
    config: Config = None, data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Statistics, models, alerts and recommendations of one device."""
    start, end = parse_time(since), parse_time(until) if until else now()
    store = _store(config, data_dir)
    known = store.query("SELECT 1 FROM devices WHERE device_id=? UNION SELECT 1 FROM telemetry "
                        "WHERE device_id=? LIMIT 1", (device_id, device_id))
    if not known:
        typer.secho(f"error: no such device {device_id!r} in {store.path}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    result = device_report(store, device_id, start, end)
    if as_json:
        typer.echo(json.dumps(asdict(result), indent=2))
        return
    console = Console()
    table = Table(title=f"{device_id}: {dt.datetime.fromtimestamp(start, dt.UTC):%Y-%m-%d %H:%M}"
                  f" to {dt.datetime.fromtimestamp(end, dt.UTC):%Y-%m-%d %H:%M} UTC")
    table.add_column("statistic")
    table.add_column("value", justify="right")

    def fmt(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    for name, value in (
        ("uptime", f"{result.uptime_s / 3600:.2f} h ({result.uptime_percent:.0f} % of the "
                   f"{result.observed_s / 3600:.2f} h since first seen)"),
        ("telemetry messages", str(result.telemetry_messages)),
        ("CPU avg / max",
         f"{fmt(result.cpu_percent_avg, ' %')} / {fmt(result.cpu_percent_max, ' %')}"),
        ("memory avg / max",
         f"{fmt(result.memory_percent_avg, ' %')} / {fmt(result.memory_percent_max, ' %')}"),
        ("temperature avg / max",
         f"{fmt(result.temperature_c_avg, ' °C')} / {fmt(result.temperature_c_max, ' °C')}"),
        ("predictions / errors", f"{result.predictions} / {result.errors} "
         f"({result.error_rate_percent:.2f} %)"),
    ):
        table.add_row(name, value)
    console.print(table)
    for m in result.models:
        console.print(f"model {m.model} ({', '.join(m.versions)}): {m.samples} inferences, "
                      f"latency mean {fmt(m.latency_ms_mean, ' ms')}, p95 "
                      f"{fmt(m.latency_ms_p95, ' ms')}, errors {fmt(m.error_rate_percent, ' %')}"
                      f", accuracy {fmt(None if m.accuracy is None else 100 * m.accuracy, ' %')}")
    console.print(f"alerts in the period: {len(result.alerts)}")
    for advice in result.recommendations:
        console.print(f"- {advice}")


# The groups and commands the root CLI finds through the ``edgefl.commands`` entry points.
cloud_app.callback()(cloud_main)
cloud_app.command("status")(cloud_status)
fl_app.command("start")(fl_start)
fl_app.command("status")(fl_status)
__all__ = ["alerts", "cloud_app", "cmd", "devices", "fl_app", "report"]
