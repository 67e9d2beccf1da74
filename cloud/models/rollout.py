"""Staged model rollouts, run by the cloud service and gated by live telemetry and alerts.

``edgefl model release`` hands a :class:`RolloutSpec` to the running service
(a request row); the :class:`RolloutManager`, one asyncio task that owns every
rollout, then:

1. checks each known device against the version's requirements (format,
   runtime, memory: a model needing more than 80 % of a device's available
   memory is refused, GPU) and lists the skipped devices with reasons;
2. publishes the retained chunks, then the signed manifest targeting the
   canary devices;
3. watches the devices' ``DeploymentStatus``, and the alert engine: a share of
   failures above the threshold, or an alert at or above the abort severity on a
   targeted device, aborts at once; after the probation with neither, it widens
   the target to the next step, and after the last step the version is active;
4. on abort, sends ``rollback`` to every device that installed the version,
   republishes the previous version (or withdraws the release when there was
   none) and records why.

Only one version per model is retained on the broker: when the manifest moves to
another version, the chunks of the version it replaced are cleared (empty
retained messages), so the broker's memory does not grow with releases.

The rollout's record and each device's state are rows (:mod:`cloud.models.rollout_store`)
written at every transition, so a restarted service resumes each rollout at the
same stage with the same deadline. Disk work runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self, cast, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud.errors import CloudOffline
from cloud.health import HealthCounters
from cloud.models.experiments import ab_assign, fleet_figures
from cloud.models.registry import (
    ModelRegistry,
    ModelVersion,
    RegistryError,
    VersionState,
)
from cloud.models.rollout_store import (
    FINISHED,
    DeviceState,
    ModelRequest,
    Rollout,
    RolloutStore,
)
from cloud.models.variants import VariantError
from cloud.models.variants import resolve as resolve_builds
from cloud.offload import off_loop
from cloud.registry import DeviceRecord, DeviceRegistry
from cloud.releases import build_release, load_signing_key
from cloud.storage.sink import AlertEvent, RolloutEvent, RolloutEventKind, TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from schemas.base import Id, ModelFormat, RuntimeName, Severity, now
from schemas.device import Command, DeploymentState, DeploymentStatus
from schemas.release import MAX_CHUNK_BYTES, MAX_VARIANTS, ReleaseVariant, Requirements, Targeting
from schemas.topics import Topics

logger = logging.getLogger(__name__)

TICK_S = 0.5
MEMORY_SHARE = 0.8
"""A model may need at most this share of a device's available memory."""
RUNTIME_OF = {ModelFormat.ONNX: RuntimeName.ONNXRUNTIME, ModelFormat.TFLITE: RuntimeName.LITERT,
              ModelFormat.TORCHSCRIPT: RuntimeName.TORCHSCRIPT}
SEVERITY_RANK = {Severity.CRITICAL: 0, Severity.MAJOR: 1, Severity.MINOR: 2,
                 Severity.WARNING: 3}
IN_PROGRESS: frozenset[str] = frozenset({"downloading"})
INSTALL_GRACE_S = 60.0
"""After its probation, a stage waits at most this long (or one more probation) for online
targets that have not reported yet, so that a short probation does not judge too early."""
WATCHED: frozenset[str] = frozenset({"running", "experiment"})
"""Rollout states in which device failures and alerts abort."""
FAILURES: frozenset[str] = frozenset({"failed", "rolled_back"})

Publish = Callable[[str, bytes, bool], Awaitable[None]]


class RolloutSpec(BaseModel):
    """What ``edgefl model release`` asks for."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: Id
    version: Annotated[str, Field(min_length=1, max_length=64)]
    canary_percent: Annotated[float, Field(gt=0, le=100)] | None = Field(
        default=None, description="Share of the compatible devices in the canary stage")
    canary_devices: list[Id] = Field(default_factory=list, max_length=10_000)
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [100.0], min_length=1, max_length=20,
        description="Percent of the compatible devices after each widening; ends at 100")
    probation_s: Annotated[float, Field(ge=0, le=30 * 86_400)] = 600.0
    abort_failed_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    abort_alert_severity: Severity | None = Severity.MAJOR
    force: bool = Field(default=False, description="Release a `rejected` version anyway")
    ab_version: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="A/B experiment: `version` (A, the one the fleet runs) "
        "stays on part of the fleet, this version (B) goes to `split_percent` of it")
    split_percent: Annotated[float, Field(gt=0, lt=100)] = 50.0
    variants: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=MAX_VARIANTS,
        description="Other builds of the release (versions of the same model) that devices "
        "may take instead, each the fastest it can load")
    auto_variants: bool = Field(
        default=False, description="Add the optimizer's deployable siblings of the version "
        "(same parent, not rejected) as variants")

    @model_validator(mode="after")
    def _steps_rise_to_all(self) -> Self:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase")
        if self.steps[-1] != 100:
            raise ValueError("the last step must be 100 (the whole fleet)")
        if self.canary_percent is not None and self.canary_devices:
            raise ValueError("give a canary share or canary devices, not both")
        if self.ab_version is not None:
            if self.ab_version == self.version:
                raise ValueError("an A/B experiment needs two different versions")
            if self.canary_percent is not None or self.canary_devices or self.steps != [100]:
                raise ValueError("an A/B experiment has its own split: no canary or steps")
            if self.variants or self.auto_variants:
                raise ValueError("an A/B experiment compares two builds: no variants")
        return self


class RolloutRefused(Exception):  # noqa: N818 - a refusal, not a failure of ours
    """A request the manager does not carry out; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Which devices a rollout takes, in which order, and which it skips."""

    order: list[str]
    canary: list[str]
    stage_sizes: list[int]
    skipped: dict[str, str]


def memory_needed_mb(version: ModelVersion, measured: dict[str, float]) -> float:
    """Memory a device needs for the model: measured peak when known, else twice its size."""
    peak = measured.get("peak_memory_mb")
    return float(peak) if peak is not None else 2 * version.size_bytes / (1024 * 1024)


def device_problems(record: DeviceRecord, fmt: ModelFormat, need_mb: float,
                    requirements: Requirements) -> list[str]:
    """Why a device cannot take the version (empty when it can)."""
    problems = []
    if record.model_formats and fmt.value not in record.model_formats:
        problems.append(f"no {fmt.value} support (has {', '.join(record.model_formats)})")
    runtime = RUNTIME_OF[fmt].value
    if record.runtimes and runtime not in record.runtimes:
        problems.append(f"no {runtime} runtime")
    wanted = [r.value for r in requirements.runtimes]
    if wanted and not set(wanted) & set(record.runtimes):
        problems.append(f"none of the runtimes {wanted}")
    available = record.memory_available_mb
    need = max(need_mb, requirements.min_memory_mb)
    if available is not None and need > MEMORY_SHARE * available:
        problems.append(f"needs {need:.0f} MiB, more than {MEMORY_SHARE:.0%} of the "
                        f"{available:.0f} MiB available")
    if requirements.gpu and not record.gpu:
        problems.append("needs a GPU")
    return problems


def stable_order(key: str, device_ids: Sequence[str]) -> list[str]:
    """Devices in a deterministic pseudo-random order (a hash of ``key`` and the id)."""
    return sorted(device_ids,
                  key=lambda d: hashlib.sha256(f"{key}\x00{d}".encode()).hexdigest())


Needs = tuple[ModelFormat, float, Requirements]
"""What one build of a release needs: format, memory (MiB), requirements."""


def _eligible(builds: Sequence[Needs], devices: Sequence[DeviceRecord],
              ) -> tuple[list[DeviceRecord], dict[str, str]]:
    """The devices that can take one of the builds, and why each of the others cannot."""
    skipped: dict[str, str] = {}
    eligible: list[DeviceRecord] = []
    for record in devices:
        problems = [device_problems(record, fmt, need, reqs) for fmt, need, reqs in builds]
        if all(problems):
            skipped[record.device_id] = " | ".join("; ".join(p) for p in problems)
        else:
            eligible.append(record)
    return eligible, skipped


def plan_rollout(spec: RolloutSpec, fmt: ModelFormat, need_mb: float,
                 requirements: Requirements, devices: Sequence[DeviceRecord],
                 variants: Sequence[Needs] = ()) -> Plan:
    """The canary set and the stages over the devices that can take a build.

    Raises:
        RolloutRefused: no compatible device, or a named canary device unknown or unfit.
    """
    eligible, skipped = _eligible([(fmt, need_mb, requirements), *variants], devices)
    if not eligible:
        raise RolloutRefused("no known device can take it"
                             + (f" ({len(skipped)} skipped)" if skipped else ""))
    ids = [r.device_id for r in eligible]
    order = stable_order(f"{spec.model}/{spec.version}", ids)
    if spec.canary_devices:
        for device in spec.canary_devices:
            if device in skipped:
                raise RolloutRefused(f"canary device {device} cannot take it: {skipped[device]}")
            if device not in ids:
                raise RolloutRefused(f"canary device {device} is not known to the registry")
        canary = sorted(set(spec.canary_devices))
    else:
        share = spec.canary_percent if spec.canary_percent is not None else 10.0
        count = max(1, math.ceil(len(ids) * share / 100))
        online = {r.device_id for r in eligible if r.online}
        # Online devices first: a canary that is offline validates nothing.
        canary = sorted(sorted(order, key=lambda d: d not in online)[:count])
    if spec.ab_version is not None:
        control, candidate = ab_assign(spec.model, spec.version, spec.ab_version, ids,
                                       spec.split_percent)
        if not candidate or not control:
            raise RolloutRefused(f"a {spec.split_percent:g}% split of {len(ids)} compatible "
                                 "device(s) leaves one side empty")
        # Stage 0 is the experiment (B on its group), stage 1 B everywhere (promote B).
        return Plan(candidate + control, candidate, [len(candidate), len(ids)], skipped)
    order = canary + [d for d in order if d not in canary]
    sizes = [len(canary)]
    for step in spec.steps:
        size = max(sizes[-1], math.ceil(len(order) * step / 100))
        if size > sizes[-1]:
            sizes.append(size)
    sizes[-1] = len(order)
    return Plan(order, canary, sizes, skipped)


def _as_state(value: str) -> DeviceState:
    if value not in get_args(DeviceState):
        raise ValueError(f"unknown device state {value!r}")
    return cast("DeviceState", value)


def device_state(status: DeploymentStatus, version: str | Collection[str], current: str | None,
                 ) -> tuple[DeviceState, str | None] | None:
    """What a device's status says about its part in the rollout of ``version``.

    ``version`` may be every build of the release (the version and its variants);
    an installed variant is named in the detail.
    """
    builds = {version} if isinstance(version, str) else set(version)
    state = status.state
    if state in (DeploymentState.DOWNLOADING, DeploymentState.VERIFYING,
                 DeploymentState.INSTALLING) and status.target_version in builds:
        return "downloading", None
    if state is DeploymentState.INSTALLED and status.active_version in builds:
        return "installed", None if len(builds) == 1 else status.active_version
    if state is DeploymentState.FAILED and status.target_version in builds:
        return "failed", status.error
    if state is DeploymentState.INCOMPATIBLE and status.target_version in builds:
        return "incompatible", "; ".join(status.reasons)
    if state is DeploymentState.ROLLED_BACK and current in ("installed", "downloading") \
            and status.active_version not in builds:
        return "rolled_back", status.error
    return None


class RolloutManager:
    """Owns every rollout: requests, stages, watching, aborts (one asyncio task)."""

    def __init__(self, *, store: SqliteStore, models: ModelRegistry, devices: DeviceRegistry,
                 topics: Topics, publish: Publish, health: HealthCounters, key_path: Path,
                 key_id: str, chunk_bytes: int, sinks: Sequence[TelemetrySink] = ()) -> None:
        self.rollouts = RolloutStore(store)
        self.sinks = list(sinks)
        self.models = models
        self.devices = devices
        self.topics = topics
        self.publish = publish
        self.health = health
        self.key_path = key_path
        self.key_id = key_id
        self.chunk_bytes = min(chunk_bytes, MAX_CHUNK_BYTES)
        self.inbox: asyncio.Queue[DeploymentStatus | AlertEvent] = asyncio.Queue()
        self.active: dict[int, Rollout] = {}
        self.states: dict[int, dict[str, str]] = {}
        self.ready = asyncio.Event()
        self._key: Ed25519PrivateKey | None = None

    # -- entry points (event loop) -------------------------------------------------------

    def observe(self, deployments: Sequence[DeploymentStatus],
                alerts: Sequence[AlertEvent]) -> None:
        """Committed statuses and alert transitions (called by ingest after each commit)."""
        if not self.active:
            return
        models = {r.model for r in self.active.values()}
        for status in deployments:
            if status.model in models:
                self.inbox.put_nowait(status)
        for event in alerts:
            if event.transition == "opened":
                self.inbox.put_nowait(event)

    async def run(self) -> None:
        """Own the rollouts until cancelled."""
        for rollout in await off_loop(self.rollouts.running):
            await self._adopt(rollout)
            logger.info("rollout %d of %s %s resumed at stage %d (%s)", rollout.id,
                        rollout.model, rollout.version, rollout.stage, rollout.state)
        self.ready.set()
        last_requests = 0.0
        while True:
            item: DeploymentStatus | AlertEvent | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    item = await self.inbox.get()
            try:
                if isinstance(item, DeploymentStatus):
                    await self._on_status(item)
                elif isinstance(item, AlertEvent):
                    await self._on_alert(item)
                if time.monotonic() - last_requests >= TICK_S:
                    last_requests = time.monotonic()
                    for request in await off_loop(self.rollouts.pending):
                        await self._on_request(request)
                for rollout in list(self.active.values()):
                    await self._advance_guarded(rollout)
            except CloudOffline as exc:  # publications wait for the connection; state kept
                logger.debug("rollouts wait for the broker: %s", exc)
            except Exception:  # the one handler of this task: log, count, go on
                self.health.error("rollout_error")
                logger.exception("rollout manager step failed")

    async def _advance_guarded(self, rollout: Rollout) -> None:
        """One step; a failure that is not the broker's ends the rollout with the reason."""
        try:
            await self._advance(rollout)
        except CloudOffline:
            raise
        except Exception as exc:
            self.health.error("rollout_error")
            logger.exception("rollout %d: step failed", rollout.id)
            why = f"internal error: {type(exc).__name__}: {exc}"
            if rollout.state in WATCHED:
                await self._abort(rollout, why)
                return
            rollout.state = "aborted"
            rollout.reason = f"{rollout.reason}; abort incomplete: {why}"[:1024]
            rollout.finished_at = time.time()
            await off_loop(self.rollouts.save, rollout)
            self._drop(rollout)

    async def _adopt(self, rollout: Rollout) -> None:
        self.active[rollout.id] = rollout
        devices = await off_loop(self.rollouts.devices, rollout.id)
        self.states[rollout.id] = {d: v["state"] for d, v in devices.items()}

    # -- requests ------------------------------------------------------------------------

    async def _on_request(self, request: ModelRequest) -> None:
        try:
            detail = await self._carry_out(request)
        except (RolloutRefused, RegistryError) as exc:
            await off_loop(self.rollouts.answer, request.id, "refused", str(exc)[:2000])
            logger.warning("model request %d (%s) refused: %s", request.id, request.action, exc)
            return
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            await off_loop(self.rollouts.answer, request.id, "refused",
                           f"{where}: {first['msg']}")
            return
        await off_loop(self.rollouts.answer, request.id, "done", detail)

    async def _carry_out(self, request: ModelRequest) -> str:
        body = request.body
        if request.action == "release":
            return await self._release(RolloutSpec.model_validate_json(json.dumps(body)))
        if request.action == "rollback":
            return await self._rollback_request(str(body.get("model")),
                                                str(body.get("reason") or "operator rollback"))
        if request.action == "retire":
            return await self._retire(str(body.get("model")), str(body.get("version")))
        if request.action == "promote":
            winner = body.get("version")
            return await self._promote(str(body.get("model")),
                                       None if winner is None else str(winner))
        raise RolloutRefused(f"unknown action {request.action!r}")

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            if not self.key_path.exists():
                raise RolloutRefused(f"no release key at {self.key_path}: run "
                                     "`edgefl model keygen` and give devices its public key")
            self._key = load_signing_key(self.key_path)
        return self._key

    async def _release(self, spec: RolloutSpec) -> str:
        candidate = spec.ab_version or spec.version
        version = await off_loop(self.models.get, spec.model, candidate)
        fmt = version.format.deployable
        if fmt is None:
            raise RolloutRefused(f"{spec.model} {candidate} is {version.format.value}: "
                                 "optimize it into a deployable format first")
        if version.state is VersionState.REJECTED and not spec.force:
            raise RolloutRefused(f"{spec.model} {candidate} is rejected"
                                 f"{' (' + version.note + ')' if version.note else ''}: "
                                 "pass --force to release it anyway")
        if version.state is VersionState.RETIRED:
            raise RolloutRefused(f"{spec.model} {candidate} is retired")
        for other in self.active.values():
            if other.model == spec.model:
                raise RolloutRefused(f"rollout {other.id} of {other.model} {other.version} is "
                                     "running: wait for it, or roll it back")
        self._signing_key()
        requirements = Requirements.model_validate(version.requirements or {})
        measured = {m.name: m.value for m in await off_loop(
            self.models.metrics, spec.model, candidate)}
        try:
            builds = await off_loop(resolve_builds, self.models, version, spec.variants,
                                    auto=spec.auto_variants)
        except VariantError as exc:
            raise RolloutRefused(f"variant refused: {exc}") from None
        variant_needs = [await off_loop(self._needs, v) for v in builds.variants]
        published, _ = await off_loop(self.rollouts.publication, spec.model)
        previous = published if published != candidate else None
        if previous is None:
            actives = [v for v in await off_loop(self.models.versions, spec.model)
                       if v.state is VersionState.ACTIVE and v.version != candidate]
            previous = actives[-1].version if actives else None
        if spec.ab_version is not None and previous != spec.version:
            await off_loop(self.models.get, spec.model, spec.version)  # unknown: NotFound
            raise RolloutRefused(
                f"an A/B experiment compares a candidate with the version the fleet runs: "
                f"{spec.model} runs {previous or 'no release'}, not {spec.version}; "
                f"release {spec.version} first")
        plan = plan_rollout(spec, fmt, memory_needed_mb(version, measured), requirements,
                            self.devices.devices(), variant_needs)
        rollout = Rollout(
            id=0, model=spec.model, version=candidate, state="running",
            spec=spec.model_dump(mode="json"), previous_version=previous, order=plan.order,
            canary=plan.canary, stage_sizes=plan.stage_sizes, skipped=plan.skipped,
            created_at=now(), variants=[v.version for v in builds.variants],
            prefer=builds.prefer)
        states: dict[str, tuple[DeviceState, str | None]] = dict.fromkeys(
            plan.order, ("pending", None))
        states.update({d: ("skipped", why) for d, why in plan.skipped.items()})
        await off_loop(self.models.set_state, spec.model, candidate, VersionState.CANARY,
                       f"A/B experiment against {spec.version} on {len(plan.canary)} device(s)"
                       if spec.ab_version else
                       f"rollout to {len(plan.canary)} canary device(s)")
        for variant in builds.variants:
            if variant.state is not VersionState.ACTIVE:  # an active one serves already
                await off_loop(self.models.set_state, spec.model, variant.version,
                               VersionState.RELEASED, f"variant of {candidate}")
        rollout = await off_loop(self.rollouts.create, rollout, states)
        await self._adopt(rollout)
        await self._event(rollout, "started")
        logger.info("rollout %d: %s %s to %d device(s) in %d stage(s), canary %s, %d skipped",
                    rollout.id, spec.model, candidate, len(plan.order),
                    len(plan.stage_sizes), ", ".join(plan.canary), len(plan.skipped))
        await self._advance_soon(rollout)
        if spec.ab_version is not None:
            control = plan.order[len(plan.canary):]
            return (f"rollout {rollout.id}: A/B experiment, {spec.version} (A) stays on "
                    f"{len(control)} device(s), {candidate} (B) goes to {', '.join(plan.canary)}"
                    + (f"; {len(plan.skipped)} skipped" if plan.skipped else ""))
        return (f"rollout {rollout.id}: canary {', '.join(plan.canary)}; stages "
                f"{'/'.join(str(s) for s in plan.stage_sizes)} of {len(plan.order)} device(s)"
                + (f"; variants {', '.join(rollout.variants)}" if rollout.variants else "")
                + (f"; {len(plan.skipped)} skipped" if plan.skipped else ""))

    def _needs(self, version: ModelVersion) -> Needs:
        """What a device needs to take ``version`` (worker thread)."""
        fmt = version.format.deployable
        assert fmt is not None  # noqa: S101 - variants are deployable (resolve_builds)
        measured = {m.name: m.value for m in self.models.metrics(version.model,
                                                                 version.version)}
        return (fmt, memory_needed_mb(version, measured),
                Requirements.model_validate(version.requirements or {}))

    async def _promote(self, model: str, winner: str | None) -> str:
        """End an A/B experiment: B widens to every device, or A is kept and B rolled back."""
        rollout = next((r for r in self.active.values()
                        if r.model == model and r.spec.get("ab_version")), None)
        if rollout is None or rollout.state not in WATCHED \
                or rollout.stage != 0:
            raise RolloutRefused(f"no A/B experiment of {model} is running")
        control, candidate = rollout.previous_version, rollout.version
        if control is None:  # an A/B release always has A; an old record may not
            raise RolloutRefused(f"rollout {rollout.id} has no control version")
        winner = winner or candidate
        if winner not in (control, candidate):
            raise RolloutRefused(f"{winner} is not in the experiment ({control} vs {candidate})")
        await off_loop(self._record_fleet, rollout, control,
                       rollout.order[len(rollout.canary):])
        await off_loop(self._record_fleet, rollout, candidate, rollout.canary)
        if winner == candidate:
            rollout.state = "running"
            rollout.stage = 1
            await off_loop(self.rollouts.save, rollout)
            await off_loop(self.models.record_event, model, candidate, "promoted",
                           f"won the A/B experiment against {control}")
            await self._event(rollout, "promoted")
            await self._advance_soon(rollout)
            return (f"{model} {candidate} promoted: rollout {rollout.id} widens to all "
                    f"{len(rollout.order)} device(s)")
        await self._abort(rollout, f"A/B experiment ended: {control} kept", counted=False)
        return (f"{model} {control} kept: {candidate} rolled back on "
                f"{len(rollout.rollback_sent)} device(s)")

    def _record_fleet(self, rollout: Rollout, version: str, devices: Sequence[str]) -> None:
        """What the fleet measured of ``version`` in this rollout, into the registry."""
        figures = fleet_figures(self.rollouts.store, rollout.model, version,
                                rollout.created_at, devices)
        if figures.windows:
            self.models.add_metrics(rollout.model, version, "fleet",
                                    figures.as_registry_metrics())

    async def _rollback_request(self, model: str, reason: str) -> str:
        for rollout in self.active.values():
            if rollout.model == model:
                await self._abort(rollout, f"operator: {reason}")
                return f"rollout {rollout.id} of {model} {rollout.version} rolled back"
        versions = await off_loop(self.models.versions, model)
        active = [v for v in versions if v.state is VersionState.ACTIVE]
        if not active:
            raise RolloutRefused(f"{model} has no active version to roll back")
        done = await off_loop(self.rollouts.completed, model)
        last = next((r for r in done if r.version in {v.version for v in active}), None)
        previous = last.previous_version if last is not None else None
        if last is None or previous is None:
            raise RolloutRefused(f"{model} {active[-1].version} has no previous version to "
                                 "return to")
        current = last.version
        builds = set(last.builds())
        running = [r.device_id for r in self.devices.devices()
                   if r.models.get(model) in builds]
        rollout = Rollout(
            id=0, model=model, version=current, state="aborting",
            spec={"rollback_of": current}, previous_version=previous, order=running,
            canary=[], stage_sizes=[len(running)], reason=f"operator: {reason}",
            created_at=now(), published_stage=0, chunks_published=True,
            variants=list(last.variants), prefer=dict(last.prefer))
        rollout = await off_loop(self.rollouts.create, rollout,
                                 dict.fromkeys(running, ("installed", None)))
        await self._adopt(rollout)
        await self._advance_soon(rollout)
        return f"{model} {current} rolled back to {previous} on {len(running)} device(s)"

    async def _retire(self, model: str, version: str) -> str:
        for rollout in self.active.values():
            if rollout.model == model and version in rollout.builds():
                raise RolloutRefused(f"rollout {rollout.id} of {model} {rollout.version} is "
                                     f"running with {version}: roll it back first")
        current = await off_loop(self.models.get, model, version)
        if current.state is VersionState.RETIRED:
            raise RolloutRefused(f"{model} {version} is retired already")
        published, count = await off_loop(self.rollouts.publication, model)
        if version in await off_loop(self.rollouts.published_variants, model):
            raise RolloutRefused(f"{model} {version} is a variant of the retained release "
                                 f"{published}: release another version first")
        if published == version:  # offline: CloudOffline, the request is tried again
            await self.publish(self.topics.release(model), b"", True)
            await self._clear_retained(model, ())
            await off_loop(self.rollouts.set_publication, model, None, 0)
        await off_loop(self.models.set_state, model, version, VersionState.RETIRED, "operator")
        if published != version:
            return f"{model} {version} retired (nothing of it was retained)"
        return f"{model} {version} retired; its release and {count} chunk(s) cleared"

    async def _advance_soon(self, rollout: Rollout) -> None:
        """Take the first step now; without a broker, the next ticks take it."""
        try:
            await self._advance(rollout)
        except CloudOffline as exc:
            logger.info("rollout %d waits for the broker: %s", rollout.id, exc)

    # -- watching ------------------------------------------------------------------------

    def _running_for(self, model: str) -> Rollout | None:
        return next((r for r in self.active.values()
                     if r.model == model and r.state in WATCHED), None)

    async def _on_status(self, status: DeploymentStatus) -> None:
        rollout = self._running_for(status.model)
        if rollout is None or status.ts < rollout.created_at:
            return
        states = self.states[rollout.id]
        current = states.get(status.device_id)
        if current is None or current == "skipped":
            return
        seen = device_state(status, rollout.builds(), current)
        if seen is None or seen[0] == current:
            return
        state, detail = seen
        if detail is not None and rollout.variants and state == "installed":
            detail = f"build {detail}"
        states[status.device_id] = state
        await off_loop(self.rollouts.set_devices, rollout.id,
                       {status.device_id: (state, None, detail)})
        if state in FAILURES:
            logger.warning("rollout %d: %s %s on %s: %s", rollout.id, rollout.model,
                           state, status.device_id, detail)
            await self._check_failures(rollout)

    async def _on_alert(self, event: AlertEvent) -> None:
        alert = event.alert
        for rollout in list(self.active.values()):
            limit = rollout.spec.get("abort_alert_severity")
            if rollout.state not in WATCHED or limit is None:
                continue
            if SEVERITY_RANK[alert.severity] > SEVERITY_RANK[Severity(limit)]:
                continue
            if alert.device_id not in rollout.targets() or alert.opened_at < rollout.created_at:
                continue
            await self._abort(rollout, f"alert {alert.rule} ({alert.severity.value}) on "
                              f"{alert.device_id}")

    async def _check_failures(self, rollout: Rollout) -> None:
        targets = rollout.targets()
        states = self.states[rollout.id]
        failed = sum(1 for d in targets if states.get(d) in FAILURES)
        limit = float(rollout.spec.get("abort_failed_percent", 20.0))
        if targets and 100 * failed / len(targets) > limit:
            await self._abort(rollout, f"{failed} of {len(targets)} targeted device(s) failed "
                              f"(more than {limit:g}%)")

    # -- the state machine ---------------------------------------------------------------

    async def _advance(self, rollout: Rollout) -> None:
        if rollout.state == "aborting":
            await self._finish_abort(rollout)
            return
        if rollout.state == "experiment":
            await self._check_failures(rollout)
            return
        if rollout.state != "running":
            return
        version = await off_loop(self.models.get, rollout.model, rollout.version)
        if not rollout.chunks_published:
            for build in await off_loop(self._builds, rollout.model, rollout.builds()):
                await self._publish_chunks(build)
            rollout.chunks_published = True
            await off_loop(self.rollouts.save, rollout)
        if rollout.published_stage < rollout.stage:
            await self._publish_stage(rollout, version)
            return
        await self._check_failures(rollout)
        if rollout.state == "running" and time.time() >= rollout.deadline:
            await self._end_of_probation(rollout, version)

    async def _end_of_probation(self, rollout: Rollout, version: ModelVersion) -> None:
        """Widen, complete, or abort when nothing installed (or wait for downloads)."""
        states = self.states[rollout.id]
        targets = rollout.targets()
        online = {r.device_id for r in self.devices.devices(online=True)}
        busy = [d for d in targets if states.get(d) in IN_PROGRESS
                or (states.get(d) == "pending" and d in online)]
        probation = float(rollout.spec.get("probation_s", 0.0))
        if busy and time.time() < rollout.deadline + max(probation, INSTALL_GRACE_S):
            return  # online targets still installing: wait for them, bounded
        installed = [d for d in targets if states.get(d) == "installed"]
        if not installed:
            await self._abort(rollout, f"no device of stage {rollout.stage} installed "
                              f"{rollout.version} within the probation")
            return
        if rollout.spec.get("ab_version") and rollout.stage == 0:
            rollout.state = "experiment"
            await off_loop(self.rollouts.save, rollout)
            await self._event(rollout, "experiment")
            logger.info("rollout %d: A/B experiment of %s: %s on %d device(s), %s on the "
                        "others; `edgefl model compare`, then `edgefl model promote`",
                        rollout.id, rollout.model, rollout.version, len(installed),
                        rollout.previous_version)
            return
        if rollout.stage < rollout.last_stage:
            rollout.stage += 1
            await off_loop(self.rollouts.save, rollout)
            logger.info("rollout %d: %s %s widens to stage %d (%d device(s))", rollout.id,
                        rollout.model, rollout.version, rollout.stage,
                        len(rollout.targets()))
            await self._publish_stage(rollout, version)
            return
        await self._complete(rollout)

    async def _publish_chunks(self, version: ModelVersion) -> int:
        data = await off_loop(self.models.read, version)
        size = self.chunk_bytes
        count = max(1, math.ceil(len(data) / size))
        for index in range(count):
            await self.publish(self.topics.chunk(version.model, version.version, index),
                               data[index * size:(index + 1) * size], True)
        return count

    def _builds(self, model: str, versions: Sequence[str]) -> list[ModelVersion]:
        """Registry records of a release's builds (worker thread)."""
        return [self.models.get(model, v) for v in versions]

    def _chunk_count(self, version: ModelVersion) -> int:
        return max(1, math.ceil(version.size_bytes / self.chunk_bytes))

    def _manifest(self, version: ModelVersion, targeting: Targeting, rollout_id: int,
                  variants: Sequence[str] = (), prefer: dict[str, list[str]] | None = None,
                  ) -> tuple[bytes, int, dict[str, int]]:
        """The signed manifest, its chunk count and its variants' (worker thread)."""
        fmt = version.format.deployable
        assert fmt is not None  # noqa: S101 - checked at release
        data = self.models.read(version)
        extra: list[ReleaseVariant] = []
        for other in self._builds(version.model, variants):
            other_fmt = other.format.deployable
            assert other_fmt is not None  # noqa: S101 - checked at release
            extra.append(ReleaseVariant(
                version=other.version, format=other_fmt, size_bytes=other.size_bytes,
                sha256=other.sha256, chunk_size=self.chunk_bytes,
                chunk_count=self._chunk_count(other), input_shape=other.input_shape,
                requirements=Requirements.model_validate(other.requirements or {})))
        manifest, chunks = build_release(
            version.model, version.version, data, fmt=fmt, key=self._signing_key(),
            key_id=self.key_id, chunk_size=self.chunk_bytes, targeting=targeting,
            input_shape=version.input_shape,
            metadata={"rollout": rollout_id, "parent": version.parent_version,
                      "task": version.task, "fl_task": version.fl_task,
                      "fl_round": version.fl_round},
            variants=extra, prefer=prefer)
        return manifest.to_json(), len(chunks), {v.version: v.chunk_count for v in extra}

    async def _clear_retained(self, model: str, keep: Collection[str]) -> None:
        """Clear the chunks of the retained builds that are not in ``keep``."""
        published, count = await off_loop(self.rollouts.publication, model)
        retained = dict(await off_loop(self.rollouts.published_variants, model))
        if published is not None:
            retained[published] = count
        for old, old_count in retained.items():
            if old not in keep:
                await self._clear_chunks(model, old, old_count)

    async def _publish_stage(self, rollout: Rollout, version: ModelVersion) -> None:
        requirements = Requirements.model_validate(version.requirements or {})
        if rollout.stage == 0 and rollout.last_stage > 0:
            targeting = Targeting(stage="canary", canary=rollout.canary,
                                  requirements=requirements)
        elif rollout.stage == rollout.last_stage:
            targeting = Targeting(stage="fleet", devices=None, canary=rollout.canary,
                                  requirements=requirements)
        else:
            targeting = Targeting(stage="fleet", devices=rollout.targets(),
                                  canary=rollout.canary, requirements=requirements)
        payload, count, variants = await off_loop(self._manifest, version, targeting,
                                                  rollout.id, rollout.variants, rollout.prefer)
        await self.publish(self.topics.release(rollout.model), payload, True)
        await self._clear_retained(rollout.model, rollout.builds())
        await off_loop(self.rollouts.set_publication, rollout.model, rollout.version, count,
                       variants)
        rollout.published_stage = rollout.stage
        rollout.stage_started_at = time.time()
        rollout.deadline = rollout.stage_started_at + float(rollout.spec.get("probation_s", 0))
        await off_loop(self.rollouts.save, rollout)
        states = self.states[rollout.id]
        earlier = set(rollout.targets(rollout.stage - 1)) if rollout.stage else set()
        staged: dict[str, tuple[DeviceState, int | None, str | None]] = {
            d: (_as_state(states.get(d, "pending")), rollout.stage, None)
            for d in rollout.targets() if d not in earlier}
        await off_loop(self.rollouts.set_devices, rollout.id, staged)
        await self._event(rollout, "stage")
        logger.info("rollout %d: %s %s stage %d published to %s device(s), probation until %s",
                    rollout.id, rollout.model, rollout.version, rollout.stage,
                    "all" if targeting.devices is None and targeting.stage == "fleet"
                    else len(rollout.targets()), time.strftime(
                        "%H:%M:%S", time.localtime(rollout.deadline)))

    async def _clear_chunks(self, model: str, version: str, count: int) -> None:
        for index in range(count):
            await self.publish(self.topics.chunk(model, version, index), b"", True)

    async def _complete(self, rollout: Rollout) -> None:
        states = self.states[rollout.id]
        details = await off_loop(self.rollouts.devices, rollout.id)
        active: dict[str, tuple[DeviceState, int | None, str | None]] = {
            d: ("active", details.get(d, {}).get("stage"), details.get(d, {}).get("detail"))
            for d, s in states.items() if s == "installed"}
        await off_loop(self.rollouts.set_devices, rollout.id, active)
        for device in active:
            states[device] = "active"
        await off_loop(self._record_fleet, rollout, rollout.version, list(active))
        await off_loop(self._supersede, rollout)
        rollout.state = "completed"
        rollout.finished_at = time.time()
        await off_loop(self.rollouts.save, rollout)
        await self._event(rollout, "completed")
        self._drop(rollout)
        logger.info("rollout %d: %s %s is active on %d device(s)", rollout.id, rollout.model,
                    rollout.version, len(active))

    def _supersede(self, rollout: Rollout) -> None:
        """Registry: the builds devices run active, the ones they replace released.

        Runs on a worker thread.
        """
        running = {rollout.version}
        if rollout.variants:
            running |= {str(d["detail"]).removeprefix("build ")
                        for d in self.rollouts.devices(rollout.id).values()
                        if d["state"] == "active" and d["detail"]}
        for version in self.models.versions(rollout.model):
            if version.state is VersionState.ACTIVE and version.version not in running:
                self.models.set_state(rollout.model, version.version, VersionState.RELEASED,
                                      f"superseded by {rollout.version}")
        for build in sorted(running & set(rollout.builds())):
            self.models.set_state(rollout.model, build, VersionState.ACTIVE,
                                  f"rollout {rollout.id} completed")

    async def _abort(self, rollout: Rollout, reason: str, *, counted: bool = True) -> None:
        if rollout.state not in WATCHED:
            return
        rollout.state = "aborting"
        rollout.reason = reason[:1024]
        await off_loop(self.rollouts.save, rollout)
        if counted:
            self.health.error("rollout_aborted")
        logger.warning("rollout %d: %s %s aborted: %s", rollout.id, rollout.model,
                       rollout.version, reason)
        await self._finish_abort(rollout)

    async def _finish_abort(self, rollout: Rollout) -> None:
        """Rollback commands, then the previous version back on the broker (idempotent)."""
        states = self.states[rollout.id]
        to_roll = [d for d, s in states.items()
                   if s == "installed" and d not in rollout.rollback_sent]
        for device in to_roll:
            command = Command(correlation_id=f"rollout-{rollout.id}-{secrets.token_hex(4)}",
                              ts=now(), args={"model": rollout.model,
                                              "reason": (rollout.reason or "")[:200]})
            await self.publish(self.topics.command(device, "rollback"), command.to_json(), False)
            rollout.rollback_sent.append(device)
        if to_roll:
            await off_loop(self.rollouts.save, rollout)
        published, _ = await off_loop(self.rollouts.publication, rollout.model)
        kept: list[str] = []
        if rollout.previous_version is not None:
            previous = await off_loop(self.models.get, rollout.model, rollout.previous_version)
            variants, prefer = await off_loop(self._release_of, rollout.model, previous.version,
                                              rollout.builds())
            kept = [previous.version, *variants]
            if published != previous.version:
                for build in await off_loop(self._builds, rollout.model, kept):
                    await self._publish_chunks(build)
                payload, count, counts = await off_loop(
                    self._manifest, previous, Targeting(stage="fleet"), rollout.id, variants,
                    prefer)
                await self.publish(self.topics.release(rollout.model), payload, True)
                await self._clear_retained(rollout.model, kept)
                await off_loop(self.rollouts.set_publication, rollout.model,
                               previous.version, count, counts)
        elif published is not None:
            await self.publish(self.topics.release(rollout.model), b"", True)
            await self._clear_retained(rollout.model, ())
            await off_loop(self.rollouts.set_publication, rollout.model, None, 0)
        if rollout.chunks_published and published != rollout.version:
            for build in await off_loop(self._builds, rollout.model, rollout.builds()):
                if build.version not in kept:
                    await self._clear_chunks(rollout.model, build.version,
                                             self._chunk_count(build))
        await off_loop(self.rollouts.set_devices, rollout.id, dict.fromkeys(
            rollout.rollback_sent, ("rolled_back", None, "rollback sent")))
        await off_loop(self._rolled_back, rollout)
        rollout.state = "aborted"
        rollout.finished_at = time.time()
        await off_loop(self.rollouts.save, rollout)
        await self._event(rollout, "aborted")
        self._drop(rollout)
        logger.warning("rollout %d: %s back on %s; %d device(s) told to roll back",
                       rollout.id, rollout.model, rollout.previous_version or "no release",
                       len(rollout.rollback_sent))

    def _release_of(self, model: str, version: str, leave_out: Collection[str] = (),
                    ) -> tuple[list[str], dict[str, list[str]]]:
        """The variants and preferences ``version`` was last released with.

        Retired variants, and those in ``leave_out`` (the builds of a rollout rolled
        back), are left out. Runs on a worker thread.
        """
        done = next((r for r in self.rollouts.completed(model) if r.version == version), None)
        if done is None:
            return [], {}
        usable = [v for v in done.variants if v not in leave_out
                  and self.models.get(model, v).state is not VersionState.RETIRED]
        return usable, {c: [v for v in order if v in usable or v == version]
                        for c, order in done.prefer.items()}

    def _rolled_back(self, rollout: Rollout) -> None:
        """Registry: the version rolled back, the previous one active (worker thread)."""
        version = self.models.get(rollout.model, rollout.version)
        if version.state is not VersionState.ROLLED_BACK:
            self.models.set_state(rollout.model, rollout.version, VersionState.ROLLED_BACK,
                                  rollout.reason or "rolled back")
        kept = set(self._release_of(rollout.model, rollout.previous_version,
                                    rollout.builds())[0]) if rollout.previous_version else set()
        for variant in self._builds(rollout.model, rollout.variants):
            if variant.version not in kept and variant.state in (VersionState.RELEASED,
                                                                 VersionState.ACTIVE):
                self.models.set_state(rollout.model, variant.version, VersionState.ROLLED_BACK,
                                      f"variant of {rollout.version}: "
                                      f"{rollout.reason or 'rolled back'}")
        if rollout.previous_version is not None:
            previous = self.models.get(rollout.model, rollout.previous_version)
            if previous.state is not VersionState.ACTIVE:
                self.models.set_state(rollout.model, previous.version, VersionState.ACTIVE,
                                      f"restored by rollout {rollout.id}")

    async def _event(self, rollout: Rollout, event: RolloutEventKind) -> None:
        """Tell the sinks (SQLite, InfluxDB for Grafana) about a step of the rollout."""
        states = self.states.get(rollout.id, {})
        targets = rollout.targets()
        record = RolloutEvent(
            rollout=rollout.id, model=rollout.model, version=rollout.version, event=event,
            at=time.time(), stage=rollout.stage, targets=len(targets),
            installed=sum(1 for d in targets if states.get(d) in ("installed", "active")),
            failed=sum(1 for d in targets if states.get(d) in FAILURES),
            detail=rollout.reason)
        for sink in self.sinks:
            try:
                await off_loop(sink.write_rollout_event, record)
            except (sqlite3.Error, OSError, RuntimeError):  # never stops a rollout; counted
                self.health.error("rollout_event_sink")
                logger.exception("rollout %d: event %s not stored by %s", rollout.id, event,
                                 type(sink).__name__)

    def _drop(self, rollout: Rollout) -> None:
        if rollout.state in FINISHED:
            self.active.pop(rollout.id, None)
            self.states.pop(rollout.id, None)

    # -- reading (any thread) --------------------------------------------------------------

    def status(self, model: str) -> dict[str, Any] | None:
        """The model's latest rollout with its devices (for ``edgefl model status``)."""
        rollout = self.rollouts.latest(model)
        if rollout is None:
            return None
        return {"rollout": rollout.id, "model": rollout.model, "version": rollout.version,
                "state": rollout.state, **rollout.record(),
                "devices": self.rollouts.devices(rollout.id)}
