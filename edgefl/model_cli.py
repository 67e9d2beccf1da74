"""``edgefl model``: the model registry from the command line.

This group lives in the composition root because it uses both sides: the cloud's
registry (in the cloud store) and the edge's inference runtimes, which check
that a file loads in the runtime of its format before it is registered.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cloud.models.formats import ArtifactFormat, FormatError, check_claim, detect_format
from cloud.models.registry import ModelRegistry, ModelVersion, RegistryError
from cloud.models.rollout_store import FINISHED, RolloutStore
from cloud.settings import CloudSettings
from cloud.storage.sqlite_store import SqliteStore
from schemas.errors import SchemaError
from schemas.topics import validate_id

logger = logging.getLogger(__name__)

PIPED_WIDTH = 200
"""Columns of tables written to a pipe or file (rich would cut them at 80)."""


def _console() -> Console:
    """Standard output: the terminal's width, or wide enough never to cut a cell in a pipe."""
    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)

DataDir = Annotated[Path | None, typer.Option(help="Cloud data folder [var/cloud]")]
Config = Annotated[Path | None, typer.Option(help="Cloud TOML/YAML settings file")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output")]

model_app = typer.Typer(name="model", no_args_is_help=True,
                        help="Model operations: registry, release key.")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line; the caller raises what this returns."""
    typer.secho(f"error: {' '.join(message.split())[:500]}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def load_settings(config: Path | None, data_dir: Path | None) -> CloudSettings:
    """The cloud's settings, or one error line and exit 2."""
    try:
        return CloudSettings.load(config, data_dir=data_dir)
    except (SchemaError, ValueError) as exc:
        raise fail(str(exc)) from None


def open_registry(settings: CloudSettings, *, create: bool = False) -> ModelRegistry:
    """The registry in the cloud store (created by ``register``, else it must exist)."""
    if not create and not settings.sqlite_path.exists():
        raise fail(f"no cloud store at {settings.sqlite_path}")
    return ModelRegistry(SqliteStore(settings.sqlite_path), settings.artifacts_dir)


def open_rollouts(settings: CloudSettings) -> RolloutStore:
    """Requests and rollouts in the cloud store (which must exist)."""
    if not settings.sqlite_path.exists():
        raise fail(f"no cloud store at {settings.sqlite_path}")
    return RolloutStore(SqliteStore(settings.sqlite_path))


def _date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- keygen ------------------------------------------------------------------------------


@model_app.command("keygen")
def keygen(
    config: Config = None, data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing key (devices must then trust the new one)")] = False,
) -> None:
    """Create the release signing key (owner-only) where the cloud's settings point."""
    from cloud.releases import generate_signing_key, public_key_b64

    settings = load_settings(config, data_dir)
    path = settings.release_key_path
    if path.exists() and not force:
        raise fail(f"{path} exists: keep it, or pass --force to replace it")
    key = generate_signing_key(path)
    public = path.with_suffix(".pub")
    public.write_text(public_key_b64(key) + "\n", encoding="ascii")
    typer.echo(f"release key {settings.models.key_id} written to {path}, its public key to "
               f"{public}")
    typer.echo("devices trust it with (edge settings), inline or as a file:")
    typer.echo(f"  ota:\n    trusted_keys:\n      {settings.models.key_id}: {public_key_b64(key)}"
               f"\n    trusted_key_files:\n      {settings.models.key_id}: {public}")


# -- register ----------------------------------------------------------------------------


def _input_shape(path: Path, fmt: ArtifactFormat) -> list[int] | None:
    """Load the file in its runtime (the check) and return its input shape, -1 dynamic."""
    from edge_node.errors import EdgeError
    from edge_node.inference import load_runtime

    deployable = fmt.deployable
    assert deployable is not None  # noqa: S101 - weights are checked by the task
    try:
        runtime = load_runtime(path, deployable)
    except EdgeError as exc:
        raise fail(f"{path} does not load as {fmt.value}: {exc}") from None
    try:
        spec = runtime.inputs[0]
        return [-1 if d is None else d for d in spec.shape] if spec.known else None
    finally:
        runtime.close()


def _check_weights(data: bytes, task: str | None, task_kwargs: dict[str, Any]) -> list[str]:
    from cloud.models.weights import WeightsError, task_weights
    from fl_tasks.base import load_task
    from fl_tasks.errors import TaskError

    if task is None:
        raise fail("a weights file needs --task (the task whose model it fits)")
    try:
        loaded = task_weights(load_task(task, **task_kwargs), data)
    except (TaskError, WeightsError) as exc:
        raise fail(f"the weights do not fit {task}: {exc}") from None
    return loaded.from_task


@model_app.command("register")
def register(
    file: Annotated[Path, typer.Argument(help="Model file (ONNX, TFLite, TorchScript or "
                                               "safetensors weights of a task)")],
    name: Annotated[str, typer.Option("--name", help="Model name")],
    version: Annotated[str, typer.Option("--version", help="Semantic version, e.g. 1.2.0")],
    fmt: Annotated[str, typer.Option(
        "--format", help="auto, onnx, tflite, torchscript or weights")] = "auto",
    task: Annotated[str | None, typer.Option(
        help="Task import path (package.module:Class) the model belongs to")] = None,
    task_kwarg: Annotated[list[str] | None, typer.Option(
        "--task-arg", help="Task constructor argument k=v (JSON value), repeatable")] = None,
    parent: Annotated[str | None, typer.Option(help="Version this one derives from")] = None,
    note: Annotated[str | None, typer.Option(help="Free text kept with the version")] = None,
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
) -> None:
    """Register a model file: it must be the format it claims and load in its runtime."""
    try:
        validate_id(name, "model name")
        data = file.read_bytes()
    except (SchemaError, ValueError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from None
    if not data:
        raise fail(f"{file} is empty")
    kwargs = _task_kwargs(task_kwarg or [])
    try:
        if fmt == "auto":
            kind = detect_format(data)
        else:
            try:
                kind = ArtifactFormat(fmt)
            except ValueError:
                raise fail(f"unknown format {fmt!r}: auto, "
                           + ", ".join(f.value for f in ArtifactFormat)) from None
            check_claim(data, kind)
    except FormatError as exc:
        raise fail(f"{file}: {exc}") from None
    shape: list[int] | None = None
    from_task: list[str] = []
    if kind is ArtifactFormat.WEIGHTS:
        from_task = _check_weights(data, task, kwargs)
    else:
        shape = _input_shape(file, kind)
    settings = load_settings(config, data_dir)
    registry = open_registry(settings, create=True)
    try:
        registered = registry.register(
            name, version, data, kind, task=task, parent_version=parent, input_shape=shape,
            note=note, recipe={"source": "register", "file": file.name,
                               **({"task_kwargs": kwargs} if kwargs else {})})
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(registered.as_json(), indent=2))
        return
    typer.echo(f"registered {name} {version}: {kind.value}, {registered.size_bytes} bytes, "
               f"sha256 {registered.sha256[:12]}, {registered.state.value}")
    if from_task:
        typer.echo(f"note: {len(from_task)} tensor(s) not in the file take the task's initial "
                   f"values: {', '.join(from_task[:5])}{' ...' if len(from_task) > 5 else ''}")


def _task_kwargs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise fail(f"--task-arg {pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# -- list / show -------------------------------------------------------------------------


@model_app.command("list")
def list_models(config: Config = None, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Registered models with their version count, newest and active versions."""
    registry = open_registry(load_settings(config, data_dir))
    models = registry.models()
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    table = Table(title="models")
    for column in ("model", "task", "versions", "latest", "active", "created"):
        table.add_column(column)
    for m in models:
        table.add_row(m["name"], m["task"] or "-", str(m["versions"]), m["latest"] or "-",
                      ", ".join(m["active"]) or "-", _date(m["created_at"]))
    _console().print(table)


@model_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str | None, typer.Argument(help="Version; all versions when left out")]
    = None,
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
) -> None:
    """A model's versions, or one version with its lineage, metrics and history."""
    registry = open_registry(load_settings(config, data_dir))
    try:
        if version is None:
            versions = registry.versions(name)
            if as_json:
                typer.echo(json.dumps([v.as_json() for v in versions], indent=2))
                return
            _versions_table(name, versions)
            return
        one = registry.get(name, version)
        lineage = registry.lineage(name, version)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    metrics = registry.metrics(name, version)
    events = registry.events(name, version)
    if as_json:
        typer.echo(json.dumps({
            **one.as_json(), "lineage": [v.version for v in lineage],
            "metrics": [{"source": m.source, "device_class": m.device_class, "name": m.name,
                         "value": m.value, "measured_at": m.measured_at} for m in metrics],
            "events": [{"ts": e.ts, "event": e.event, "detail": e.detail} for e in events],
        }, indent=2))
        return
    console = _console()
    console.print(f"{name} {version}: {one.format.value}, {one.size_bytes} bytes, "
                  f"{one.state.value}, sha256 {one.sha256}")
    console.print("lineage: " + " <- ".join(v.version for v in lineage)
                  + (f"; FL task {one.fl_task} round {one.fl_round}" if one.fl_task else "")
                  + (f"; recipe {json.dumps(one.recipe)}" if one.recipe else ""))
    if metrics:
        table = Table(title="metrics")
        for column in ("source", "device class", "name", "value", "measured"):
            table.add_column(column)
        for m in metrics:
            table.add_row(m.source, m.device_class or "-", m.name, f"{m.value:.6g}",
                          _date(m.measured_at))
        console.print(table)
    table = Table(title="history")
    for column in ("when", "event", "detail"):
        table.add_column(column)
    for e in events:
        table.add_row(_date(e.ts), e.event, e.detail or "")
    console.print(table)


def _versions_table(name: str, versions: list[ModelVersion]) -> None:
    table = Table(title=f"{name}: versions")
    for column in ("version", "format", "state", "size", "parent", "FL round", "note",
                   "created"):
        table.add_column(column)
    for v in versions:
        table.add_row(v.version, v.format.value, v.state.value, str(v.size_bytes),
                      v.parent_version or "-", "-" if v.fl_round is None else str(v.fl_round),
                      v.note or "", _date(v.created_at))
    _console().print(table)


# -- rollouts (handed to the running cloud service) ----------------------------------------

_DURATION = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    raw = text.strip().lower()
    unit = _DURATION.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit else raw
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise fail(f"duration {text!r}: expected a number with s, m, h or d") from None
    if not math.isfinite(value) or value < 0:
        raise fail(f"duration {text!r} must not be negative")
    return value


def parse_percent(text: str, what: str) -> float:
    """``10%`` or ``10`` -> 10.0."""
    try:
        return float(text.strip().removesuffix("%"))
    except ValueError:
        raise fail(f"{what} {text!r}: expected a percentage such as 10%") from None


def parse_abort_on(text: str) -> float:
    """``failed>20%`` -> 20.0 (the share of targeted devices that may fail)."""
    name, sep, limit = text.replace(" ", "").partition(">")
    if name != "failed" or not sep:
        raise fail(f"--abort-on {text!r}: expected failed>N%")
    return parse_percent(limit, "--abort-on")


def _submit(settings: CloudSettings, action: str, body: dict[str, Any], wait: float) -> str:
    """Hand a request to the running service; its answer (exit 1 when refused or unserved)."""
    import threading
    import time

    requests = open_rollouts(settings)
    request_id = requests.request(action, body)  # type: ignore[arg-type]
    deadline = time.monotonic() + wait
    pause = threading.Event()
    while (request := requests.get_request(request_id)) is not None \
            and request.state == "pending":
        if time.monotonic() > deadline and requests.withdraw(request_id):
            raise fail(f"no cloud service answered within {wait:.0f} s: is `edgefl cloud` "
                       f"running with {settings.data_dir}?", 1)
        pause.wait(0.2)
    if request is None or request.state != "done":
        raise fail(f"refused: {request.detail if request else 'request lost'}", 1)
    return request.detail or ""


@model_app.command("release")
def release(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str, typer.Argument(help="Version to roll out")],
    canary: Annotated[str | None, typer.Option(
        help="Share of the compatible devices in the canary stage, e.g. 10%")] = None,
    canary_devices: Annotated[str | None, typer.Option(
        help="Explicit canary devices, comma-separated")] = None,
    steps: Annotated[str, typer.Option(
        help="Percent of the fleet after each widening, e.g. 10,50,100")] = "100",
    probation: Annotated[str, typer.Option(help="Watch time per stage, e.g. 10m")] = "10m",
    abort_on: Annotated[str, typer.Option(
        help="Abort when more than this share of targeted devices fails")] = "failed>20%",
    abort_on_alert: Annotated[str, typer.Option(
        help="Abort on an alert of this severity or worse on a targeted device "
             "(critical, major, minor, warning, or none)")] = "major",
    force: Annotated[bool, typer.Option("--force", help="Release a rejected version")] = False,
    ab: Annotated[str | None, typer.Option(
        "--ab", help="A/B experiment: VERSION (A, the one the fleet runs) stays, this "
                     "version (B) goes to --split of the devices")] = None,
    split: Annotated[str, typer.Option(help="Share of the devices that take B, e.g. 50%")]
    = "50%",
    variants: Annotated[str | None, typer.Option(
        help="Other builds devices may take instead, each the fastest it loads: `auto` "
             "(the optimizer's deployable siblings within tolerance) or versions, "
             "comma-separated (`auto,V` adds V)")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Print the stages until the rollout ends (or an A/B experiment "
                         "serves both versions); exit 1 if it aborts")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the service")] = 30.0,
    config: Config = None, data_dir: DataDir = None,
) -> None:
    """Hand a staged rollout (canary, steps, probation) or an A/B experiment to the service."""
    from pydantic import ValidationError

    from cloud.models.registry import VersionState
    from cloud.models.rollout import RolloutSpec

    settings = load_settings(config, data_dir)
    registry = open_registry(settings)
    candidate = ab or version
    try:
        registry.get(name, version)
        found = registry.get(name, candidate)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if found.format.deployable is None:
        raise fail(f"{name} {candidate} is {found.format.value}: optimize it into a "
                   "deployable format first")
    if found.state is VersionState.REJECTED and not force:
        raise fail(f"{name} {candidate} is rejected: pass --force to release it anyway")
    body: dict[str, Any] = {
        "model": name, "version": version,
        "steps": [parse_percent(s, "--steps") for s in steps.split(",") if s.strip()],
        "probation_s": parse_duration(probation), "abort_failed_percent":
        parse_abort_on(abort_on), "force": force,
        "abort_alert_severity": None if abort_on_alert.lower() == "none"
        else abort_on_alert.lower(),
    }
    if canary is not None:
        body["canary_percent"] = parse_percent(canary, "--canary")
    if canary_devices:
        body["canary_devices"] = [d.strip() for d in canary_devices.split(",") if d.strip()]
    if ab is not None:
        body["ab_version"] = ab
        body["split_percent"] = parse_percent(split, "--split")
    if variants is not None:
        named = [v.strip() for v in variants.split(",") if v.strip()]
        body["auto_variants"] = "auto" in named
        body["variants"] = [v for v in named if v != "auto"]
    try:
        spec = RolloutSpec.model_validate(body, strict=False)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise fail(f"{where + ': ' if where else ''}{first['msg']}") from None
    detail = _submit(settings, "release", spec.model_dump(mode="json"), wait)
    typer.echo(detail)
    if follow:
        outcome = _follow_rollout(settings, name)
        if outcome not in ("completed", "experiment"):
            raise typer.Exit(1)


def _follow_rollout(settings: CloudSettings, model: str) -> str:
    import threading


    rollouts = open_rollouts(settings)
    pause = threading.Event()
    shown: tuple[str, int] | None = None
    while True:
        rollout = rollouts.latest(model)
        if rollout is None:
            raise fail(f"no rollout of {model}", 1)
        devices = rollouts.devices(rollout.id)
        now_shown = (rollout.state, rollout.stage)
        if now_shown != shown:
            shown = now_shown
            states = _count_states(devices)
            typer.echo(f"rollout {rollout.id}: {rollout.state}, stage {rollout.stage + 1} of "
                       f"{rollout.last_stage + 1} ({len(rollout.targets())} device(s)); "
                       f"{states}" + (f"; {rollout.reason}" if rollout.reason else ""))
        if rollout.state in FINISHED or rollout.state == "experiment":
            return rollout.state
        pause.wait(0.5)


def _count_states(devices: dict[str, dict[str, Any]]) -> str:
    from collections import Counter

    counts = Counter(d["state"] for d in devices.values())
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no devices"


@model_app.command("status")
def rollout_status(
    name: Annotated[str, typer.Argument(help="Model name")],
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
) -> None:
    """The model's latest rollout: its stage, and every device's state."""
    rollouts = open_rollouts(load_settings(config, data_dir))
    rollout = rollouts.latest(name)
    if rollout is None:
        raise fail(f"no rollout of {name!r}")
    devices = rollouts.devices(rollout.id)
    published, _ = rollouts.publication(name)
    events = rollouts.store.rollout_events(rollout.id)
    if as_json:
        typer.echo(json.dumps({"rollout": rollout.id, "model": rollout.model,
                               "version": rollout.version, "state": rollout.state,
                               **rollout.record(), "retained_version": published,
                               "devices": devices, "events": events}, indent=2))
        return
    console = _console()
    deadline = ("-" if rollout.state != "running"
                else dt.datetime.fromtimestamp(rollout.deadline).strftime("%H:%M:%S"))
    console.print(f"rollout {rollout.id}: {name} {rollout.version} {rollout.state}, stage "
                  f"{rollout.stage + 1} of {rollout.last_stage + 1} "
                  f"({len(rollout.targets())} of {len(rollout.order)} device(s)), probation "
                  f"until {deadline}; previous {rollout.previous_version or '-'}; retained "
                  f"{published or '-'}"
                  + (f"; variants {', '.join(rollout.variants)}" if rollout.variants else "")
                  + (f"; {rollout.reason}" if rollout.reason else ""))
    table = Table(title="devices")
    for column in ("device", "state", "stage", "detail", "updated"):
        table.add_column(column)
    for device, row in devices.items():
        table.add_row(device, row["state"], "-" if row["stage"] is None else str(row["stage"] + 1),
                      row["detail"] or "", _date(row["updated_at"]))
    console.print(table)
    steps = Table(title="steps")
    for column in ("when", "event", "stage", "targets", "installed", "failed", "detail"):
        steps.add_column(column)
    for event in events:
        steps.add_row(_date(event["ts"]), event["event"], str(event["stage"] + 1),
                      str(event["targets"]), str(event["installed"]), str(event["failed"]),
                      event["detail"] or "")
    console.print(steps)


@model_app.command("compare")
def compare(
    name: Annotated[str, typer.Argument(help="Model name")],
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
    min_windows: Annotated[int, typer.Option(
        min=0, help="Wait until each version has this many metrics windows "
        "(ModelMetrics) from its group")] = 0,
    wait: Annotated[str, typer.Option(
        help="Longest wait for --min-windows (10s, 5m); then exit 1")] = "2m",
) -> None:
    """The A/B experiment's two versions side by side, as the fleet measured them."""
    import threading
    import time

    from cloud.models.experiments import compare as compare_figures
    from cloud.models.experiments import fleet_figures
    rollouts = open_rollouts(load_settings(config, data_dir))
    store = rollouts.store
    rollout = next((r for r in rollouts.history(name) if r.spec.get("ab_version")), None)
    if rollout is None or rollout.previous_version is None:
        raise fail(f"{name} has had no A/B experiment")
    control = rollout.previous_version
    until = rollout.finished_at
    group_b = rollout.canary
    group_a = rollout.order[len(group_b):]
    deadline = time.monotonic() + parse_duration(wait)
    pause = threading.Event()
    while True:
        a = fleet_figures(store, name, control, rollout.created_at, group_a)
        b = fleet_figures(store, name, rollout.version, rollout.created_at, group_b)
        enough = min(a.windows, b.windows) >= min_windows
        if enough or until is not None or time.monotonic() >= deadline:
            break
        pause.wait(0.5)
    result = compare_figures(a, b)
    short = "" if enough or until is not None else (
        f"fewer than {min_windows} metrics windows per version after {wait} "
        f"(A {a.windows}, B {b.windows})")
    if as_json:
        typer.echo(json.dumps({"rollout": rollout.id, "state": rollout.state,
                               **result.as_json()}, indent=2))
        if short:
            raise fail(short, 1)
        return

    def f(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    console = _console()
    console.print(f"rollout {rollout.id}: A/B experiment of {name}, {rollout.state}"
                  + (f" (ended {_date(until)})" if until else "")
                  + (f"; {rollout.reason}" if rollout.reason else ""))
    table = Table(title=f"{name}: A {a.version} vs B {b.version}")
    for column in ("", f"A {a.version}", f"B {b.version}", "p-value", "test"):
        table.add_column(column)
    table.add_row("devices (group)", f"{a.devices} ({len(group_a)})",
                  f"{b.devices} ({len(group_b)})", "", "")
    table.add_row("windows / inferences", f"{a.windows} / {a.inferences}",
                  f"{b.windows} / {b.inferences}", "", "")
    table.add_row("latency p50 ms", f(a.latency_ms_p50), f(b.latency_ms_p50),
                  f(result.latency_p_value, 4), "Mann-Whitney U, per-window p50")
    table.add_row("latency p95 ms", f(a.latency_ms_p95), f(b.latency_ms_p95), "", "")
    table.add_row("error rate %", f(a.error_rate_percent, 3), f(b.error_rate_percent, 3),
                  f(result.error_rate_p_value, 4), "Fisher exact, inference counts")
    table.add_row("accuracy (windows)", f"{f(a.accuracy)} ({a.accuracy_windows})",
                  f"{f(b.accuracy)} ({b.accuracy_windows})", f(result.accuracy_p_value, 4),
                  "Mann-Whitney U, per-window accuracy")
    console.print(table)
    if short:
        raise fail(short, 1)


@model_app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str | None, typer.Argument(
        help="The winner: B widens to every device, A stays and B is rolled back [B]")]
    = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the service")] = 30.0,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Print the stages until the rollout ends")] = False,
    config: Config = None, data_dir: DataDir = None,
) -> None:
    """End the running A/B experiment of a model."""
    settings = load_settings(config, data_dir)
    body: dict[str, Any] = {"model": name}
    if version is not None:
        body["version"] = version
    typer.echo(_submit(settings, "promote", body, wait))
    if follow and _follow_rollout(settings, name) not in ("completed", "aborted"):
        raise typer.Exit(1)


@model_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name")],
    reason: Annotated[str, typer.Option(help="Why (kept with the rollout)")] = "operator",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the service")] = 30.0,
    config: Config = None, data_dir: DataDir = None,
) -> None:
    """Abort the running rollout, or return the fleet from the active version to the last."""
    settings = load_settings(config, data_dir)
    typer.echo(_submit(settings, "rollback", {"model": name, "reason": reason[:200]}, wait))


@model_app.command("retire")
def retire(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str, typer.Argument(help="Version")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the service")] = 30.0,
    config: Config = None, data_dir: DataDir = None,
) -> None:
    """Retire a version; its retained release and chunks are cleared from the broker."""
    settings = load_settings(config, data_dir)
    typer.echo(_submit(settings, "retire", {"model": name, "version": version}, wait))


# -- optimize / benchmark (run here, with the edge runtimes) --------------------------------


def edge_runner(threads: int = 1) -> Any:
    """Load a file in the edge runtime of its format (what devices run)."""
    from edge_node.inference import load_runtime

    def load(path: Path, fmt: Any) -> Any:
        return load_runtime(path, fmt, threads=threads)

    return load


@model_app.command("optimize")
def optimize(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str, typer.Argument(help="A weights version (FL result or checkpoint)")],
    formats: Annotated[str, typer.Option(
        help="Comma-separated recipes: onnx, onnx-int8-dynamic, onnx-int8-static, "
             "torchscript, torch-int8, tflite, tflite-int8")] = ",".join(
        ("onnx", "onnx-int8-dynamic", "onnx-int8-static", "torchscript", "torch-int8",
         "tflite", "tflite-int8")),
    prune: Annotated[float | None, typer.Option(
        min=0.0, max=0.99, help="Magnitude-prune this share of the weights, then fine-tune")]
    = None,
    structured: Annotated[bool, typer.Option(
        "--structured", help="Prune whole output channels (L2) instead of single weights")]
    = False,
    fine_tune_epochs: Annotated[int, typer.Option(min=0, max=1000)] = 3,
    distill_from: Annotated[str | None, typer.Option(
        help="Teacher NAME:VERSION (weights of a larger model) to distil into this task's "
             "model")] = None,
    temperature: Annotated[float, typer.Option(min=1.0, max=100.0)] = 4.0,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    tolerance: Annotated[float, typer.Option(
        min=0.0, help="Accuracy points an output may lose before it is rejected")] = 1.0,
    converter_python: Annotated[str | None, typer.Option(
        help="Interpreter with litert-torch for the TFLite recipes "
             "[$EDGEFL_CONVERTER_PYTHON, else this one]")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for optimization.json [{data_dir}/optimizations/NAME-VERSION]")] = None,
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
) -> None:
    """Convert a task's weights for the edge: every output is checked, measured, registered."""
    from cloud.models.optimizer import RECIPES, OptimizeError, Optimizer, Options
    from fl_tasks.errors import TaskError

    recipes = [r.strip() for r in formats.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise fail(f"unknown recipe {unknown[0] if unknown else '(none)'}: "
                   f"{', '.join(RECIPES)}")
    teacher: tuple[str, str] | None = None
    if distill_from is not None:
        teacher_name, sep, teacher_version = distill_from.partition(":")
        if not sep or not teacher_name or not teacher_version:
            raise fail(f"--distill-from {distill_from!r}: expected NAME:VERSION")
        teacher = (teacher_name, teacher_version)
    settings = load_settings(config, data_dir)
    registry = open_registry(settings)
    optimizer = Optimizer(registry, edge_runner(), converter_python=converter_python)
    options = Options(recipes=recipes, prune=prune, prune_structured=structured,
                      fine_tune_epochs=fine_tune_epochs, distill_from=teacher,
                      temperature=temperature, alpha=alpha, tolerance=tolerance)
    console = Console(stderr=True)
    try:
        with console.status(f"optimizing {name} {version}") as status:
            report = optimizer.optimize(name, version, options,
                                        progress=status.update)
    except (OptimizeError, RegistryError, TaskError) as exc:
        raise fail(str(exc)) from None
    folder = out or settings.data_dir / "optimizations" / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "optimization.json").write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
        return
    table = Table(title=f"{name} {version} ({report.source}, accuracy "
                  f"{report.parent_accuracy:.4f}) -> {folder / 'optimization.json'}")
    for column in ("recipe", "version", "state", "bytes", "x smaller", "accuracy",
                   "Δ points", "agree", "p50 ms", "p99 ms", "note"):
        table.add_column(column)

    def f(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for o in report.outputs:
        table.add_row(o.recipe, o.version or "-", o.state, str(o.size_bytes or "-"),
                      f(o.compression, 2), f(o.accuracy), f(o.accuracy_delta_points, 2),
                      f(o.agreement, 3), f(o.latency_ms_p50), f(o.latency_ms_p99),
                      o.reason or "")
    _console().print(table)


@model_app.command("benchmark")
def benchmark(
    target: Annotated[str, typer.Argument(help="A model file, or a registered model name")],
    version: Annotated[str | None, typer.Argument(help="Version, with a model name")] = None,
    runs: Annotated[int, typer.Option(min=1, max=10_000_000)] = 1000,
    warmup: Annotated[int, typer.Option(min=0, max=1_000_000)] = 50,
    threads: Annotated[int, typer.Option(min=1, max=256)] = 1,
    batch: Annotated[int, typer.Option(min=1, max=65_536)] = 1,
    fmt: Annotated[str, typer.Option("--format", help="auto, onnx, tflite, torchscript")]
    = "auto",
    devices: Annotated[str | None, typer.Option(
        help="Run it on these devices (comma-separated) instead of here: each downloads "
             "the version like a release, times it in its runtime and answers")] = None,
    timeout: Annotated[float, typer.Option(
        min=1.0, help="Seconds to wait for the devices' answers")] = 120.0,
    config: Config = None, data_dir: DataDir = None, as_json: AsJson = False,
) -> None:
    """Latency (mean, std, p50/p95/p99), throughput and peak memory in the model's runtime."""
    from edge_node.benchmark import BenchmarkError, run_benchmark
    from edge_node.errors import EdgeError

    if devices is not None:
        if version is None:
            raise fail("--devices needs a registered model: NAME VERSION")
        _fleet_benchmark(target, version, [d.strip() for d in devices.split(",") if d.strip()],
                         runs=runs, warmup=warmup, threads=threads, batch=batch,
                         timeout=timeout, config=config, data_dir=data_dir, as_json=as_json)
        return
    registered: ModelVersion | None = None
    if version is not None:
        settings = load_settings(config, data_dir)
        registry = open_registry(settings)
        try:
            registered = registry.get(target, version)
            registry.read(registered)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        path, kind = registered.path, registered.format
    else:
        path = Path(target)
        try:
            data = path.read_bytes()
            kind = detect_format(data) if fmt == "auto" else ArtifactFormat(fmt)
            check_claim(data, kind)
        except OSError as exc:
            raise fail(f"cannot read {path}: {exc.strerror or exc}") from None
        except (FormatError, ValueError) as exc:
            raise fail(f"{path}: {exc}") from None
    deployable = kind.deployable
    if deployable is None:
        raise fail(f"{target} is {kind.value}: benchmark a deployable format "
                   "(`edgefl model optimize` makes them)")
    from rich.progress import Progress

    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task(f"{path.name}: {runs} runs", total=warmup + runs)
            result = run_benchmark(path, deployable, runs=runs, warmup=warmup,
                                   threads=threads, batch=batch,
                                   loader=edge_runner(threads),
                                   tick=lambda n: progress.update(bar, advance=n))
    except (BenchmarkError, EdgeError) as exc:
        raise fail(str(exc)) from None
    if registered is not None:
        registry.add_metrics(registered.model, registered.version, "benchmark",
                             result.metrics(), device_class=result.device_class)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
        return
    typer.echo(result.summary())


def _fleet_benchmark(name: str, version: str, devices: list[str], *, runs: int, warmup: int,
                     threads: int, batch: int, timeout: float, config: Path | None,
                     data_dir: Path | None, as_json: bool) -> None:
    """``benchmark N V --devices``: the figures measured on the devices, per device."""
    from cloud.models.fleet_benchmark import FleetBenchmarkError, Options, fleet_benchmark
    if not devices:
        raise fail("--devices names no device")
    for device in devices:
        try:
            validate_id(device, "device id")
        except SchemaError as exc:
            raise fail(str(exc)) from None
    settings = load_settings(config, data_dir)
    registry = open_registry(settings)
    try:
        found = registry.get(name, version)
        registry.read(found)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if found.format.deployable is None:
        raise fail(f"{name} {version} is {found.format.value}: benchmark a deployable format")
    retained = RolloutStore(registry.store).retained_builds(name)
    try:
        with Console(stderr=True).status(f"{name} {version} on {len(devices)} device(s)"):
            answers = fleet_benchmark(
                settings, registry, found, devices,
                Options(runs=runs, warmup=warmup, threads=threads, batch=batch,
                        timeout_s=timeout), keep_chunks=version in retained)
    except FleetBenchmarkError as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps([{"device_id": a.device_id, "figures": a.figures,
                                "error": a.error} for a in answers], indent=2))
    else:
        table = Table(title=f"{name} {version} on the devices ({runs} runs, batch {batch}, "
                      f"{threads} thread(s))")
        for column in ("device", "class", "runtime", "p50 ms", "p95 ms", "p99 ms",
                       "per s", "model MiB", "error"):
            table.add_column(column)
        for a in answers:
            f = a.figures or {}

            def num(key: str, digits: int = 4, f: dict[str, Any] = f) -> str:
                value = f.get(key)
                return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"

            table.add_row(a.device_id, str(f.get("device_class", "-")),
                          str(f.get("runtime", "-")), num("latency_ms_p50"),
                          num("latency_ms_p95"), num("latency_ms_p99"),
                          num("throughput_per_s", 1), num("model_memory_mb", 1), a.error or "")
        _console().print(table)
    if any(a.error for a in answers):
        raise typer.Exit(1)


# -- package --------------------------------------------------------------------------------


@model_app.command("package")
def package(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str, typer.Argument(help="A deployable version")],
    android: Annotated[Path, typer.Option(help="Write an Android library (.aar) here")],
    config: Config = None, data_dir: DataDir = None,
) -> None:
    """Bundle a version for a mobile app: an .aar with the model in assets/ and its metadata."""
    from cloud.models.mobile import MobileError, write_aar
    from edge_node.errors import EdgeError
    from edge_node.inference import load_runtime

    settings = load_settings(config, data_dir)
    registry = open_registry(settings)
    try:
        found = registry.get(name, version)
        registry.read(found)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    deployable = found.format.deployable
    if deployable is None:
        raise fail(f"{name} {version} is {found.format.value}: package a deployable format")
    try:
        runtime = load_runtime(found.path, deployable)
    except EdgeError as exc:
        raise fail(f"{name} {version} does not load: {exc}") from None
    try:
        write_aar(android, found, runtime.inputs, runtime.outputs)
    except (MobileError, OSError) as exc:
        raise fail(str(exc)) from None
    finally:
        runtime.close()
    typer.echo(f"{android}: {name} {version} ({found.format.value}, {found.size_bytes} bytes)")
