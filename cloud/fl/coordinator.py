"""The federated-learning coordinator of one task: a persisted state machine.

waiting -> round_open -> collecting -> aggregating -> evaluating -> released -> ...
-> finished (or failed). One asyncio task owns it (:meth:`Coordinator.run`):
updates, evaluations, ticks and resynchronisations after a reconnection arrive
in its inbox and are handled one at a time, so transitions never interleave.
Decoding, validation, aggregation, evaluation and every disk write run on a
worker thread (:func:`cloud.fl.offload.off_loop`), and a message is
acknowledged to the broker only after what it changed is committed.

Persistence is incremental (:mod:`cloud.fl.fl_store`): an accepted update is a
file plus one row, a refusal one counter, and the small state record is
rewritten only at transitions; ``aggregating`` and ``evaluating`` are saved as
``collecting``, so a crash anywhere resumes the round by re-aggregating the
stored updates. Publications (plan, global weights, status) follow the state
and are repeated after every reconnection: a broker outage never leaves the
task stuck between two states. A failure inside the coordinator marks the task
failed with its reason; it never stops the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud.errors import CloudOffline
from cloud.files import write_atomic
from cloud.fl.config import FLTaskConfig
from cloud.fl.fednova import FedNova
from cloud.fl.fl_store import FLStore
from cloud.fl.privacy import (
    DPMean,
    LedgerRound,
    PrivacyState,
    count_stddev,
    initial_state,
    release_round,
    round_spec,
    spent,
)
from cloud.fl.registry import make_strategy
from cloud.fl.scaffold import Scaffold
from cloud.fl.secagg_round import Publication, SecAggRound, spec_for
from cloud.fl.strategy import Strategy
from cloud.fl.validation import validate_update
from cloud.health import HealthCounters
from cloud.models.formats import ArtifactFormat
from cloud.models.registry import ModelRegistry, VersionExistsError
from cloud.mqtt_link import Inbound
from cloud.offload import off_loop
from cloud.registry import DeviceRecord, DeviceRegistry
from cloud.storage.sink import TelemetrySink
from cloud.storage.sqlite_store import SqliteStore
from fl_tasks.base import FLTask, Weights, get_weights, load_task
from schemas.base import decode_message, now
from schemas.codec import DecodeLimits, decode, encode
from schemas.compression import CompressionError, decompress
from schemas.errors import DecodeError
from schemas.fl import (
    EvalResult,
    Fairness,
    GlobalModelEnvelope,
    PrivacySpec,
    Rejection,
    RoundPlan,
    TaskState,
    TaskStatus,
    UpdateEnvelope,
    split_control,
    with_control,
)
from schemas.secagg import SecAggError
from schemas.topics import TopicKind, Topics

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], Awaitable[None]]
Ack = Callable[[Inbound], None]
TICK_S = 0.1
MAX_FUTURE_SKEW_S = 300.0
_TRANSIENT = frozenset({TaskState.ROUND_OPEN, TaskState.AGGREGATING, TaskState.EVALUATING})
_DONE = frozenset({TaskState.FINISHED, TaskState.FAILED})


class RoundRecord(BaseModel):
    """The open round (persisted in the state record; updates are rows of their own)."""

    model_config = ConfigDict(extra="forbid")

    round: int
    attempt: int = 0
    global_version: str
    nonce: str = Field(default_factory=lambda: secrets.token_hex(16),
                       description="Drawn when the round opens, kept by its attempts; every "
                       "update must echo it (RoundPlan.nonce)")
    selected: list[str]
    asked: list[str] = Field(default_factory=list,
                             description="Selected in any attempt of this round")
    evaluate: list[str]
    issued_at: float
    deadline: float
    sampling_q: float | None = Field(
        default=None, description="Selected / eligible devices (privacy accounting)")
    eligible: int | None = Field(default=None, description="Eligible devices at the opening")


class CoordinatorState(BaseModel):
    """The persisted state machine (small: rewritten at transitions only)."""

    model_config = ConfigDict(extra="forbid")

    state: TaskState = TaskState.WAITING
    round: int = 0
    global_version: str = "0"
    current: RoundRecord | None = None
    last: dict[str, Any] | None = None
    last_selected: dict[str, float] = Field(default_factory=dict)
    best_accuracy: float | None = None
    best_round: int | None = Field(default=None, description="Round of the most accurate model")
    best_round_accuracy: float | None = None
    stale_rounds: int = 0
    message: str | None = None
    uncleared: list[str] = Field(default_factory=list,
                                 description="Global versions whose retained copy is to clear")
    privacy: PrivacyState | None = Field(
        default=None, description="Differential privacy: multiplier, bound, rounds accounted")


@dataclass
class _Round:
    """What the owner task holds about the open round, beside the persisted record."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Item:
    kind: str
    device_id: str = ""
    round: int = 0
    message: Inbound | None = None
    stage: str = ""


class Coordinator:
    """Runs one task's rounds inside the cloud service."""

    state_model: type[CoordinatorState] = CoordinatorState
    """The persisted record's model (the asynchronous coordinator extends it)."""

    def __init__(self, name: str, config: FLTaskConfig, *, topics: Topics, store: SqliteStore,
                 registry: DeviceRegistry, sinks: list[TelemetrySink], folder: Path,
                 publish: Publish, ack: Ack, health: HealthCounters,
                 models: ModelRegistry | None = None) -> None:
        self.name = name
        self.config = config
        self.topics = topics
        self.store = store
        self.registry = registry
        self.sinks = sinks
        self.folder = folder
        self.publish = publish
        self.ack = ack
        self.health = health
        self.models = models
        self.counters = health.flat
        self.task: FLTask = load_task(config.task, **config.task_kwargs)
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_params)
        self.strategy_name = config.strategy
        self.dp: DPMean | None = None
        if config.privacy is not None:
            self.dp = DPMean(self.strategy, config.privacy.mode)
            self.strategy = self.dp
        self.bits_rng = np.random.default_rng(secrets.randbits(128))
        """Noise of the clip bits' sum (central adaptive clipping)."""
        self.rng = random.Random(config.seed)  # noqa: S311 - client sampling, not crypto
        self.fl_store = FLStore(store, name)
        self.state = self.state_model()
        self.round = _Round()
        self.global_weights: Weights = {}
        self.inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self.ready = asyncio.Event()
        self._resync = False
        self._published_version: str | None = None
        self.secagg: SecAggRound | None = None
        """The open round's secure aggregation (in memory: a restart opens a new attempt)."""
        self.timings: dict[int, dict[str, float]] = {}
        """Per released round (in memory, the last 1,000; for tools and benchmarks): when
        it opened (``issued_at``) and the seconds its aggregation, central evaluation and
        release (state committed, weights, plan and status published) took."""

    # -- entry points (event loop) ---------------------------------------------------

    def submit(self, kind: TopicKind, device_id: str, round_: int, message: Inbound,
               stage: str = "") -> None:
        """A device's federated message arrived (from the dispatcher).

        An update, an evaluation or a secure-aggregation stage; acknowledged once handled.
        """
        self.inbox.put_nowait(_Item(kind.value, device_id, round_, message, stage))

    def connected(self) -> None:
        """After every (re)connection: publish the retained state again."""
        self._resync = True
        self.inbox.put_nowait(_Item("wake"))

    @property
    def accepted(self) -> dict[str, dict[str, Any]]:
        """Accepted updates of the open round, by device."""
        return self.round.accepted

    def history(self) -> list[TaskStatus]:
        """Released rounds (reads the store; for tests and tools)."""
        return self.fl_store.history()

    # -- the owner task ----------------------------------------------------------------

    async def run(self) -> None:
        """Own the state machine until cancelled."""
        try:
            await off_loop(self._load)
        except Exception as exc:
            logger.exception("%s: could not load", self.name)
            self.state = self.state_model(state=TaskState.FAILED,
                                          message=f"could not load: {exc}"[:1024])
        self.ready.set()
        while True:
            item: _Item | None = None
            try:
                async with asyncio.timeout(TICK_S):
                    item = await self.inbox.get()
            except TimeoutError:
                pass
            try:
                if self._resync:
                    self._resync = False
                    await self._republish()
                if item is not None and item.message is not None:
                    await self._on_item(item)
                await self._tick()
            except Exception as exc:  # the one handler of this task: fail it, keep the service
                self.health.error("fl_coordinator_error")
                logger.exception("%s: coordinator failed", self.name)
                await self._fail(f"internal error: {type(exc).__name__}: {exc}")
            finally:
                if item is not None and item.message is not None:
                    self.ack(item.message)

    def _load(self) -> None:
        """Read the saved state, weights and the open round's updates (worker thread)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = self.fl_store.load_state()
        if saved is not None:
            try:
                self.state = self.state_model.model_validate(saved)
            except ValidationError as exc:
                aside = self.fl_store.move_aside(str(exc)[:500])
                self.state = self.state_model(
                    state=TaskState.FAILED,
                    message=f"saved state unreadable, moved to {aside}: {exc.error_count()} "
                    "error(s)")
                self.fl_store.save_state(self.state.model_dump(mode="json"))
                self.global_weights = self._load_global()
                return
        if self.state.state in _TRANSIENT:
            self.state.state = TaskState.COLLECTING
        self.global_weights = self._load_global()
        self._load_strategy_state()
        current = self.state.current
        if current is not None and self.state.state is TaskState.COLLECTING:
            self._resume_round(current)

    # -- persistence helpers (worker thread) --------------------------------------------

    def _save(self) -> None:
        self.fl_store.save_state(self._saved_state())

    def _saved_state(self) -> dict[str, Any]:
        state = self.state
        if state.state in _TRANSIENT:
            state = state.model_copy(update={"state": TaskState.COLLECTING})
        return state.model_dump(mode="json")

    def _weights_path(self, version: str) -> Path:
        return self.folder / f"global-{version}.safetensors"

    def _strategy_path(self, version: str) -> Path:
        return self.folder / f"strategy-{version}.safetensors"

    def _update_dir(self, round_: int) -> Path:
        return self.folder / f"round-{round_}"

    def _load_global(self) -> Weights:
        path = self._weights_path(self.state.global_version)
        if path.exists():
            decoded = decode(path.read_bytes(), GlobalModelEnvelope)
            weights, _ = split_control(decoded.tensors)  # SCAFFOLD's c is strategy state
            return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        weights = {k: v.astype(np.float32) for k, v in get_weights(self.task.build_model()).items()}
        self._write_global(self.state.global_version, weights, 0)
        return weights

    def _load_strategy_state(self) -> None:
        path = self._strategy_path(self.state.global_version)
        if path.exists():
            self.strategy.load_state_arrays(decode(path.read_bytes(), GlobalModelEnvelope).tensors)

    def _write_global(self, version: str, weights: Weights, round_: int) -> bytes:
        envelope = GlobalModelEnvelope(task=self.name, version=version, round=round_,
                                       created_at=now())
        shared = {k: weights[k] for k in self.strategy.shared_names(weights)}
        payload = encode(with_control(shared, self.strategy.broadcast_arrays(shared)), envelope)
        write_atomic(self._weights_path(version), payload)
        arrays = self.strategy.state_arrays()
        if arrays:
            write_atomic(self._strategy_path(version), encode(arrays, envelope))
        return payload

    # -- status ---------------------------------------------------------------------------

    def status(self, **extra: Any) -> TaskStatus:
        """The task's status now (published retained on ``fl/{t}/status``)."""
        last = self.state.last or {}
        counts = dict(self.round.counts) if self.state.current else last.get("rejected_counts", {})
        examples = ([r.model_dump() for r in self.round.examples] if self.state.current
                    else last.get("rejected", []))
        current = self.state.current
        return TaskStatus.model_validate({
            "task": self.name, "state": self.state.state,
            "round": current.round if current is not None else self.state.round,
            "rounds_total": self.config.rounds, "global_version": self.state.global_version,
            # Between rounds: the attempt that produced the last released round.
            "attempt": current.attempt if current is not None else last.get("attempt", 0),
            "participants": last.get("participants", []),
            "rejected": examples[-20:], "rejected_counts": counts,
            "train_loss": last.get("train_loss"), "eval_loss": last.get("eval_loss"),
            "eval_accuracy": last.get("eval_accuracy"),
            "central_accuracy": last.get("central_accuracy"),
            "fairness": last.get("fairness"), "bytes_received": last.get("bytes_received", 0),
            "duration_s": last.get("duration_s"),
            "slowest_client_s": last.get("slowest_client_s"), "message": self.state.message,
            "epsilon_spent": self.state.privacy.epsilon if self.state.privacy else None,
            "dp_clip_norm": last.get("clip_norm"),
            "dp_noise_multiplier": last.get("noise_multiplier"),
            "ts": now(), **extra,
        })

    async def _send(self, topic: str, payload: bytes, retain: bool = True) -> bool:
        """Publish; when offline, remember to resynchronise after the reconnection."""
        try:
            await self.publish(topic, payload, retain)
        except CloudOffline as exc:
            # Published again by _republish() once the service is reconnected.
            logger.info("%s: publication deferred until reconnected: %s", self.name, exc)
            return False
        return True

    async def _publish_status(self, **extra: Any) -> TaskStatus:
        status = self.status(**extra)
        await self._send(self.topics.task_status(self.name), status.to_json())
        return status

    async def _republish(self) -> None:
        """The retained state of the task, as it is now (after a (re)connection)."""
        version = self.state.global_version
        if self._published_version != version:
            payload = await off_loop(self._weights_path(version).read_bytes)
            if await self._send(self.topics.global_model(self.name, version), payload):
                self._published_version = version
        for old in list(self.state.uncleared):
            if await self._send(self.topics.global_model(self.name, old), b""):
                self.state.uncleared.remove(old)
        plan = self._retained_plan()
        if self.state.state in _DONE:
            await self._send(self.topics.round_plan(self.name), b"")
        elif plan is not None:
            await self._send(self.topics.round_plan(self.name), plan.to_json())
        await self._publish_status()

    def _retained_plan(self) -> RoundPlan | None:
        """The plan devices should see now (None: leave the retained one as it is)."""
        current = self.state.current
        if current is not None and self.state.state is TaskState.COLLECTING:
            return self._plan(current)
        return None

    # -- messages -------------------------------------------------------------------------

    async def _on_item(self, item: _Item) -> None:
        message = item.message
        assert message is not None  # noqa: S101 - checked by the caller
        if item.kind == TopicKind.UPDATE.value:
            await self._on_update(item.device_id, item.round, message.payload)
        elif item.kind == TopicKind.SECAGG_DEVICE.value:
            await self._on_secagg(item.device_id, item.round, item.stage, message.payload)
        else:
            await self._on_eval(item.device_id, item.round, message.payload)

    async def _on_update(self, device_id: str, round_: int, payload: bytes) -> None:
        current = self.state.current
        if self.state.state in _DONE:
            await self._reject(round_, device_id, "task_ended",
                               f"the task is {self.state.state.value}")
            return
        if current is None or self.state.state is not TaskState.COLLECTING \
                or round_ != current.round:
            await self._reject(round_, device_id, "stale_round", f"round {round_} is not open")
            return
        if device_id not in current.asked:
            await self._reject(round_, device_id, "not_selected", "device was not selected")
            return
        if self.config.secagg is not None:
            await self._reject(round_, device_id, "secagg_required",
                               "the task aggregates securely: a plain update would show the "
                               "cloud what the device learned")
            return
        if device_id in self.round.accepted:
            # A QoS 1 redelivery, a retry: it counts once.
            self.health.duplicate(TopicKind.UPDATE.value, flat="fl_duplicate_update")
            return
        outcome = await off_loop(self._accept_update, current, device_id, payload)
        if isinstance(outcome, Rejection):
            await self._reject(round_, device_id, outcome.reason, outcome.detail or "")
            return
        self.round.accepted[device_id] = outcome
        self.health.accept(TopicKind.UPDATE.value)

    def _accept_update(self, current: RoundRecord, device_id: str, payload: bytes,
                       ) -> dict[str, Any] | Rejection:
        """Decode, validate, store and aggregate one update (worker thread)."""
        opened = self._opened(device_id, payload,
                              lambda e: self._envelope_problem(current, device_id, e))
        if isinstance(opened, Rejection):
            return opened
        envelope, delta = opened
        delta, control = split_control(delta)
        names = self.strategy.shared_names(self.global_weights)
        problem = validate_update(delta, self.global_weights, names=names,
                                  max_norm=self.config.max_update_norm)
        if problem is None and isinstance(self.strategy, Scaffold):
            problem = validate_update(control, self.global_weights, names=names,
                                      max_norm=None)
        elif problem is None and control:
            return _rejection(device_id, "extra_tensor",
                              f"control variates sent to a {self.strategy_name} task")
        if problem is not None:
            return problem.to_wire(device_id)
        delta = with_control(delta, control)
        directory = self._update_dir(current.round)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{device_id}.safetensors", payload)
        meta = {
            "num_examples": float(envelope.num_examples),
            "train_loss": envelope.train_loss, "train_accuracy": envelope.train_accuracy,
            "bytes": float(len(payload)), "train_time_s": float(envelope.train_time_s or 0.0),
            "attempt": envelope.attempt, "sha256": hashlib.sha256(payload).hexdigest(),
            "clip_bit": envelope.clip_bit, "local_steps": envelope.local_steps,
            "sent_at": envelope.sent_at,
        }
        self.fl_store.add_update(current.round, device_id, envelope.attempt, meta)
        self.strategy.add(delta, envelope.num_examples, local_steps=envelope.local_steps)
        return meta

    def _opened(self, device_id: str, payload: bytes,
                problem: Callable[[UpdateEnvelope], Rejection | None],
                ) -> tuple[UpdateEnvelope, Weights] | Rejection:
        """An update's envelope and its decompressed tensors, or why it was refused.

        ``problem`` checks the envelope before the tensors are decompressed.
        """
        size = self._update_elements()
        try:
            decoded = decode(payload, UpdateEnvelope,
                             DecodeLimits(max_bytes=max(1 << 20, 8 * size)))
            refused = problem(decoded.envelope)
            if refused is not None:
                return refused
            delta = decompress(decoded.tensors, decoded.envelope.compression,
                               max_elements=size)
        except (DecodeError, CompressionError) as exc:
            return _rejection(device_id, getattr(exc, "reason", "bad_payload"), str(exc))
        return decoded.envelope, delta

    def _envelope_problem(self, current: RoundRecord, device_id: str,
                          envelope: UpdateEnvelope) -> Rejection | None:
        """Why an update's envelope does not answer the open round (None: it does)."""
        other = self._other_opening(current, device_id, envelope)
        if other is not None:
            return other
        if envelope.sent_at > now() + MAX_FUTURE_SKEW_S:
            return _rejection(device_id, "future_timestamp",
                              f"sent_at {envelope.sent_at:.0f} is ahead of the cloud's clock")
        if isinstance(self.strategy, FedNova) and envelope.local_steps is None:
            return _rejection(device_id, "missing_local_steps",
                              "fednova: the update does not say how many local steps it took")
        privacy = self.config.privacy
        if privacy is not None and privacy.adaptive_clip is not None \
                and envelope.clip_bit is None:
            return _rejection(device_id, "missing_clip_bit",
                              "adaptive clipping: the update carries no clip_bit")
        return None

    def _other_opening(self, current: RoundRecord, device_id: str,
                       envelope: UpdateEnvelope) -> Rejection | None:
        """Whether the update was made for another device, round, base or opening."""
        if (envelope.device_id, envelope.round, envelope.task) != (
                device_id, current.round, self.name):
            return _rejection(device_id, "envelope_mismatch",
                              "envelope names another device, round or task")
        if envelope.base_version != current.global_version:
            return _rejection(device_id, "stale_base",
                              f"trained from {envelope.base_version}, round uses "
                              f"{current.global_version}")
        if envelope.nonce != current.nonce:
            return _rejection(device_id, "stale_nonce",
                              "the update answers another opening of this round (a replay, "
                              "or an update queued before the task was started again)")
        return None

    async def _reject(self, round_: int, device_id: str, reason: str, detail: str) -> None:
        """Count a refused update under the round it names (never another one)."""
        self.health.refuse(TopicKind.UPDATE.value, reason, flat=f"fl_rejected_{reason}")
        rejection = _rejection(device_id, reason, detail)
        filed = self._filed_under(round_)
        if filed is not None:
            first = self.round.counts[reason] == 0
            self.round.counts[reason] += 1
            self.round.examples = [*self.round.examples[-19:], rejection]
        else:
            first = False
        log = logger.warning if first else logger.debug
        log("%s: update from %s for round %d rejected: %s: %s", self.name, device_id, round_,
            reason, detail[:200])
        await off_loop(self.fl_store.add_rejection, max(0, round_ if filed is None else filed),
                       rejection)

    def _filed_under(self, round_: int) -> int | None:
        """The open round's number when a refusal naming ``round_`` counts in it."""
        current = self.state.current
        return current.round if current is not None and round_ == current.round else None

    async def _on_eval(self, device_id: str, round_: int, payload: bytes) -> None:
        current = self.state.current
        try:
            result = decode_message(EvalResult, payload)
        except DecodeError as exc:
            # Counted; only the first refusal of each reason is a warning (as in ingest).
            first = self.health.refused[TopicKind.EVAL.value][exc.reason] == 0
            self.health.refuse(TopicKind.EVAL.value, exc.reason,
                               flat=f"fl_refused_eval_{exc.reason}")
            (logger.warning if first else logger.debug)(
                "%s: evaluation from %s refused: %s", self.name, device_id, exc)
            return
        if current is None or round_ != current.round or device_id not in current.evaluate \
                or result.device_id != device_id or result.round != round_:
            reason = "unexpected"
        elif result.global_version != current.global_version:
            reason = "stale_base"
        elif result.nonce != current.nonce:
            reason = "stale_nonce"  # made for another opening of the round
        else:
            reason = None
        if reason is not None:
            first = self.health.refused[TopicKind.EVAL.value][reason] == 0
            self.health.refuse(TopicKind.EVAL.value, reason, flat=f"fl_refused_eval_{reason}")
            (logger.warning if first else logger.debug)(
                "%s: evaluation from %s for round %d refused: %s", self.name, device_id,
                round_, reason)
            return
        if device_id in self.round.evals:
            self.health.duplicate(TopicKind.EVAL.value, flat="fl_duplicate_eval")
            return
        meta = {"loss": result.loss, "accuracy": result.accuracy or 0.0,
                "num_examples": float(result.num_examples)}
        await off_loop(self.fl_store.add_eval, round_, device_id, meta)
        self.round.evals[device_id] = meta
        self.health.accept(TopicKind.EVAL.value)

    async def _on_secagg(self, device_id: str, round_: int, stage: str,
                         payload: bytes) -> None:
        """A device's message of a secure-aggregation stage."""
        current = self.state.current
        kind = TopicKind.SECAGG_DEVICE.value
        secagg = self.secagg
        if secagg is None or current is None or round_ != current.round \
                or self.state.state is not TaskState.COLLECTING:
            reason, detail = "stale_round", f"round {round_} does not aggregate securely now"
        else:
            try:
                fresh = await off_loop(secagg.receive, stage, device_id, payload)
            except SecAggError as exc:
                reason, detail = exc.reason, exc.detail
            else:
                if fresh:
                    self.health.accept(kind)
                else:
                    self.health.duplicate(kind, flat="fl_duplicate_secagg")
                return
        first = self.health.refused[kind][reason] == 0
        self.health.refuse(kind, reason, flat=f"fl_refused_secagg_{reason}")
        (logger.warning if first else logger.debug)(
            "%s: secure-aggregation %s message from %s for round %d refused: %s: %s",
            self.name, stage, device_id, round_, reason, detail[:200])

    async def _secagg_step(self, current: RoundRecord) -> None:
        """The stage is over: publish what the next one needs, or fold in the mean."""
        secagg = self.secagg
        assert secagg is not None  # noqa: S101 - checked by _tick
        try:
            outcome = await off_loop(secagg.advance)
        except SecAggError as exc:
            self.secagg = None
            why = (f"round {current.round}: secure aggregation stopped at {secagg.stage}: "
                   f"{exc.reason}: {exc.detail}")
            self.health.error(f"secagg_{exc.reason}")
            await self._retry_or_fail(current, why)
            return
        if isinstance(outcome, list):
            for publication in outcome:
                await self._publish_secagg(publication)
            return
        self.secagg = None
        self.round.accepted = {
            d: {"num_examples": 1.0, "bytes": float(secagg.bytes_received.get(d, 0)),
                "secagg": True} for d in outcome.survivors}
        await off_loop(self.strategy.add, outcome.mean, 1.0)
        logger.info("%s: round %d: the securely aggregated mean of %d device(s) is in",
                    self.name, current.round, len(outcome.survivors))
        await self._close_round()

    async def _publish_secagg(self, publication: Publication) -> None:
        """A stage's message: not retained (a device that reconnects late has missed it)."""
        await self._send(publication.topic, publication.payload, retain=False)

    def _open_secagg(self, record: RoundRecord) -> None:
        config = self.config.secagg
        if config is None:
            self.secagg = None
            return
        names = self.strategy.shared_names(self.global_weights)
        spec = spec_for(len(record.selected), config)
        self.secagg = SecAggRound(
            topics=self.topics, task=self.name, round=record.round, attempt=record.attempt,
            nonce=record.nonce, base_version=record.global_version,
            selected=list(record.selected), spec=spec,
            shapes={n: tuple(self.global_weights[n].shape) for n in names},
            stage_timeout_s=config.stage_timeout_s, masked_deadline=record.deadline)

    # -- the state machine ------------------------------------------------------------

    async def _tick(self) -> None:
        state = self.state.state
        if state in _DONE:
            return
        if state in (TaskState.WAITING, TaskState.RELEASED):
            await self._maybe_open_round()
        elif state is TaskState.COLLECTING and self.state.current is not None:
            current = self.state.current
            if self.config.secagg is not None:
                if self.secagg is None:  # resumed after a restart: the keys are gone
                    logger.info("%s: round %d: secure aggregation state lost with the last "
                                "process; opening a new attempt", self.name, current.round)
                    if not await self._retry(current):
                        await self._fail(f"round {current.round}: secure aggregation lost at "
                                         "a restart and too few devices to try again")
                elif self.secagg.due():
                    await self._secagg_step(current)
                return
            # Early only once every selected device has an accepted update: a refused
            # one may still be followed by a good one, and a device sending junk must
            # not close (and so fail) the round for everyone.
            if set(current.selected) <= set(self.round.accepted) or now() >= current.deadline:
                await self._close_round()

    def eligible(self) -> list[DeviceRecord]:
        """Online members that can train this task now, per the selection policy."""
        sel = self.config.selection
        devices = [d for d in self.registry.devices(online=True)
                   if self.name in d.fl_tasks and sel.runtime in d.runtimes
                   and (d.memory_available_mb or 0.0) >= sel.min_memory_mb]
        if sel.policy == "resource_aware":
            devices = [d for d in devices if self._resources_ok(d)]
        return devices

    def _resources_ok(self, device: DeviceRecord) -> bool:
        sel = self.config.selection
        t = device.last_telemetry
        if not t:
            return False
        battery, plugged = t.get("battery_percent"), t.get("battery_plugged")
        temperature, latency = t.get("temperature_c"), t.get("network_latency_ms")
        battery_ok = battery is None or plugged == 1.0 or battery >= sel.min_battery_percent
        return bool(battery_ok
                    and (temperature is None or temperature <= sel.max_temperature_c)
                    and (t.get("cpu_percent") or 0.0) <= sel.max_cpu_percent
                    and (latency is None or latency <= sel.max_latency_ms))

    def select(self, devices: list[DeviceRecord], count: int | None = None,
               ) -> tuple[list[str], list[str]]:
        """Devices to train (``count``, or per ``fraction_fit``) and to evaluate."""
        ids = sorted(d.device_id for d in devices)
        if count is None:
            count = max(self.config.min_fit_clients, round(self.config.fraction_fit * len(ids)))
        count = min(count, len(ids))
        if self.config.selection.policy == "fair":
            ranked = sorted(ids, key=lambda d: (self.state.last_selected.get(d, 0.0),
                                                self.rng.random()))
            selected = sorted(ranked[:count])
        else:
            selected = sorted(self.rng.sample(ids, count))
        n_eval = min(len(ids), max(self.config.min_evaluate_clients,
                                   round(self.config.fraction_evaluate * len(ids))))
        evaluate = sorted(self.rng.sample(ids, n_eval)) if n_eval else []
        return selected, evaluate

    async def _maybe_open_round(self) -> None:
        if self.state.round >= self.config.rounds:
            await self._finish("all rounds done")
            return
        devices = self.eligible()
        if len(devices) < self.config.min_available_clients:
            if self.state.state is not TaskState.WAITING:
                self.state.state = TaskState.WAITING
                await off_loop(self._save)
                await self._publish_status()
            return
        count = max(self.config.min_fit_clients,
                    round(self.config.fraction_fit * len(devices)))
        selected, evaluate = self.select(devices, count)
        issued = now()
        record = RoundRecord(round=self.state.round + 1, attempt=0,
                             global_version=self.state.global_version, selected=selected,
                             asked=selected, evaluate=evaluate, issued_at=issued,
                             deadline=issued + self.config.round_timeout_s,
                             sampling_q=min(1.0, len(selected) / len(devices)),
                             eligible=len(devices))
        if not await self._within_budget(record):
            return
        await self._open(record, _Round())

    async def _within_budget(self, record: RoundRecord) -> bool:
        """Differential privacy: calibrate before the first round; finish at the budget."""
        config = self.config.privacy
        if config is None:
            return True
        q = record.sampling_q or 1.0
        if self.state.privacy is None:
            self.state.privacy = await off_loop(initial_state, config, q, self.config.rounds)
        state = self.state.privacy
        if config.target_epsilon is None:
            return True
        planned = LedgerRound(round=record.round, q=q, z=state.noise_multiplier,
                              received=len(record.asked), clip_norm=state.clip_norm)
        would = await off_loop(spent, config, state, planned, record.asked)
        if would <= config.target_epsilon * (1 + 1e-9):
            return True
        await self._finish(f"privacy_budget: round {record.round} would take epsilon to "
                           f"{would:.3f}, past the target {config.target_epsilon:g} "
                           f"(spent {state.epsilon:.3f} at delta {config.delta:g})")
        return False

    async def _retry(self, current: RoundRecord) -> bool:
        """Open the next attempt of the same round, keeping what was accepted.

        A secure round keeps nothing: its sum cannot be split, the next attempt starts over.
        """
        if self.config.secagg is not None:
            self.round.accepted = {}
        accepted = set(self.round.accepted)
        devices = [d for d in self.eligible() if d.device_id not in accepted]
        needed = self.config.min_fit_clients - len(accepted)
        if not devices or len(devices) + len(accepted) < self.config.min_fit_clients:
            return False
        count = max(needed, round(self.config.fraction_fit * len(devices)))
        selected, evaluate = self.select(devices, count)
        issued = now()
        asked = sorted(set(current.asked) | set(selected))
        record = RoundRecord(round=current.round, attempt=current.attempt + 1,
                             global_version=current.global_version, nonce=current.nonce,
                             selected=selected,
                             asked=asked, evaluate=evaluate, issued_at=issued,
                             deadline=issued + self.config.round_timeout_s,
                             sampling_q=min(1.0, len(asked) / (len(devices) + len(accepted))))
        kept = _Round(accepted=self.round.accepted, evals=self.round.evals,
                      counts=self.round.counts, examples=self.round.examples)
        await self._open(record, kept)
        return True

    async def _open(self, record: RoundRecord, round_state: _Round) -> None:
        for device_id in record.selected:
            self.state.last_selected[device_id] = record.issued_at
        fresh = record.attempt == 0
        self.state.current = record
        self.state.state = TaskState.COLLECTING
        self.round = round_state
        if fresh or self.config.secagg is not None:  # a secure sum starts again from zero
            self.strategy.configure_population(record.eligible or len(record.asked))
            self.strategy.configure_training(self.config.hyperparams.momentum)
            self.strategy.begin_round(self.global_weights)
        self._open_secagg(record)
        await off_loop(self._save)  # what a restart resumes
        self.state.state = TaskState.ROUND_OPEN
        await self._publish_status(round=record.round)
        await self._send(self.topics.round_plan(self.name), self._plan(record).to_json())
        self.state.state = TaskState.COLLECTING
        logger.info("%s: round %d (attempt %d) open: %d selected, deadline in %.0f s",
                    self.name, record.round, record.attempt, len(record.selected),
                    self.config.round_timeout_s)
        await self._publish_status(round=record.round, participants=record.selected)

    def _plan(self, record: RoundRecord) -> RoundPlan:
        hp = self.config.hyperparams
        client_config = self.strategy.client_config()
        if "proximal_mu" in client_config:
            hp = hp.model_copy(update={"proximal_mu": float(client_config["proximal_mu"])})
        return RoundPlan(task=self.name, round=record.round, attempt=record.attempt,
                         global_version=record.global_version, nonce=record.nonce,
                         selected=record.selected,
                         evaluate=record.evaluate, issued_at=record.issued_at,
                         deadline=record.deadline, strategy=self.strategy_name,
                         hyperparams=hp, compression=self.config.compression,
                         max_update_norm=self.config.max_update_norm,
                         privacy=self._round_privacy(record),
                         secagg=self.secagg.spec if self.secagg is not None else None)

    def _round_privacy(self, record: RoundRecord) -> PrivacySpec | None:
        """The round's privacy parameters; the noisy mean set up for them."""
        config, state = self.config.privacy, self.state.privacy
        if config is None or state is None or self.dp is None:
            return None
        spec = round_spec(config, state, len(record.asked or record.selected))
        self.dp.configure_round(spec.clip_norm, spec.noise_multiplier * spec.clip_norm
                                if config.mode == "central" else 0.0)
        return spec

    def _resume_round(self, record: RoundRecord) -> None:
        """After a restart (worker thread): the same round, deadline and accepted updates."""
        if not record.asked:
            record.asked = list(record.selected)
        self._round_privacy(record)
        self.strategy.configure_population(record.eligible or len(record.asked))
        self.strategy.configure_training(self.config.hyperparams.momentum)
        self.strategy.begin_round(self.global_weights)
        accepted = self.fl_store.updates(record.round)
        for device_id in sorted(accepted):
            path = self._update_dir(record.round) / f"{device_id}.safetensors"
            delta = self._delta(path.read_bytes())
            self.strategy.add(delta, accepted[device_id]["num_examples"],
                              local_steps=accepted[device_id].get("local_steps"))
        rejections = self.fl_store.rejections(record.round)
        self.round = _Round(accepted=accepted, evals=self.fl_store.evals(record.round),
                            counts=Counter(rejections.counts), examples=rejections.examples)
        logger.info("%s: round %d resumed with %d update(s)", self.name, record.round,
                    len(accepted))

    def _update_elements(self) -> int:
        """Elements an update may carry: the model's (twice with SCAFFOLD's variates)."""
        size = sum(v.size for v in self.global_weights.values())
        return 2 * size if isinstance(self.strategy, Scaffold) else size

    def _delta(self, payload: bytes) -> Weights:
        size = self._update_elements()
        decoded = decode(payload, UpdateEnvelope, DecodeLimits(max_bytes=max(1 << 20, size * 8)))
        return decompress(decoded.tensors, decoded.envelope.compression, max_elements=size)

    # -- closing a round ------------------------------------------------------------------

    async def _retry_or_fail(self, current: RoundRecord, why: str) -> None:
        """A round that cannot close: its next attempt while retries are left, else fail."""
        if self.config.accept_failures and current.attempt < self.config.max_round_retries:
            logger.warning("%s: %s; retrying the round", self.name, why)
            self.state.message = why + "; retrying"
            if await self._retry(current):
                return
        await self._fail(why)

    async def _close_round(self) -> None:
        current = self.state.current
        assert current is not None  # noqa: S101 - checked by _tick
        if len(self.round.accepted) < self.config.min_fit_clients:
            why = (f"round {current.round}: {len(self.round.accepted)} update(s), fewer than "
                   f"min_fit_clients={self.config.min_fit_clients}")
            await self._retry_or_fail(current, why)
            return
        self.state.state = TaskState.AGGREGATING
        await self._publish_status()
        version = str(current.round)
        new_weights, record = await off_loop(self._aggregate, current, version)
        old_version = self.state.global_version
        self.global_weights = new_weights
        self.state.global_version = version
        self.state.round = current.round
        self.state.current = None
        self.state.message = None
        self.state.last = record
        if old_version != version:
            self.state.uncleared.append(old_version)
        stop_reason = self._early_stop(record)
        self.state.state = TaskState.RELEASED
        status = self.status()
        releasing = time.monotonic()
        await off_loop(self.fl_store.release, self._saved_state(), status)
        self.round = _Round()
        for sink in self.sinks:
            if sink is not self.store:
                await off_loop(sink.write_fl_round, status)
        await self._republish()
        self._timed(current.round, issued_at=current.issued_at,
                    release_s=time.monotonic() - releasing)
        keep = self.config.keep_update_rounds
        await off_loop(_remove_tree, self._update_dir(current.round - keep))
        await off_loop(self._prune_versions)

        if stop_reason is not None:
            await self._finish(stop_reason)

    def _prune_versions(self) -> None:
        """Delete the weights of versions nobody needs (worker thread).

        Kept: the current version, the most accurate round's (registered when the task
        ends) and those of the last ``keep_update_rounds`` rounds. Without this every
        version stayed on disk: 450 kB a version for a 112k-parameter model, 536 MB in
        ten minutes of asynchronous training at 100 devices.
        """
        round_ = self.state.round
        keep = {self.state.global_version, str(self.state.best_round)} | {
            str(r) for r in range(max(0, round_ - self.config.keep_update_rounds), round_ + 1)}
        for pattern in ("global-*.safetensors", "strategy-*.safetensors"):
            for path in self.folder.glob(pattern):
                version = path.name.split("-", 1)[1].removesuffix(".safetensors")
                if version not in keep:
                    path.unlink(missing_ok=True)

    def _aggregate(self, current: RoundRecord, version: str) -> tuple[Weights, dict[str, Any]]:
        """Aggregate, evaluate, write the new global weights (worker thread)."""
        started = time.monotonic()
        weights = self.strategy.finalize()
        self._write_global(version, weights, current.round)
        aggregated = time.monotonic()
        record = self._record(current, weights)
        self._timed(current.round, aggregate_s=aggregated - started,
                    evaluate_s=time.monotonic() - aggregated)
        self._account(current, record)
        logger.info("%s: round %d aggregated and evaluated in %.3f s", self.name, current.round,
                    time.monotonic() - started)
        return weights, record

    def _timed(self, round_: int, **seconds: float) -> None:
        """Note how long parts of a round took (:attr:`timings`)."""
        self.timings.setdefault(round_, {}).update(seconds)
        while len(self.timings) > 1000:
            del self.timings[min(self.timings)]

    def _record(self, current: RoundRecord, weights: Weights) -> dict[str, Any]:
        accepted = self.round.accepted
        total = sum(a["num_examples"] for a in accepted.values())
        losses = [a["train_loss"] * a["num_examples"] for a in accepted.values()
                  if a.get("train_loss") is not None]
        central_acc = central_loss = None
        central = self.task.central_data()
        if central is not None:
            result = self.task.evaluate(weights, central[0], central[1])
            central_acc, central_loss = result.accuracy, result.loss
        evals = self.round.evals
        accs = [e["accuracy"] for e in evals.values()]
        eval_total = sum(e["num_examples"] for e in evals.values())
        fairness = None
        if accs:
            mean = statistics.fmean(accs)
            std = statistics.pstdev(accs)
            fairness = Fairness(mean=mean, std=std, cv=std / mean if mean else 0.0,
                                disparity=max(accs) - min(accs)).model_dump()
        return {
            "round": current.round,
            "attempt": current.attempt,
            "participants": sorted(accepted),
            "rejected": [r.model_dump() for r in self.round.examples[-20:]],
            "rejected_counts": dict(self.round.counts),
            "train_loss": sum(losses) / total if losses and total else None,
            "eval_loss": (sum(e["loss"] * e["num_examples"] for e in evals.values()) / eval_total
                          if eval_total else central_loss),
            "eval_accuracy": (sum(e["accuracy"] * e["num_examples"] for e in evals.values())
                              / eval_total if eval_total else None),
            "central_accuracy": central_acc,
            "fairness": fairness,
            "bytes_received": int(sum(a["bytes"] for a in accepted.values())),
            "duration_s": max(0.0, now() - current.issued_at),
            "slowest_client_s": max((a.get("train_time_s", 0.0) for a in accepted.values()),
                                    default=0.0),
        }

    def _account(self, current: RoundRecord, record: dict[str, Any]) -> None:
        """Differential privacy: the released round into the ledger (worker thread)."""
        config, state = self.config.privacy, self.state.privacy
        if config is None or state is None:
            return
        accepted = self.round.accepted
        bits_noise = 0.0
        if config.mode == "central":  # the devices sent their bits as they are
            sigma_b = count_stddev(config, state.noise_multiplier, len(current.asked))
            if sigma_b:
                bits_noise = float(self.bits_rng.normal(0.0, sigma_b))
        bits = [float(a["clip_bit"]) for a in accepted.values() if a.get("clip_bit") is not None]
        record["clip_norm"] = state.clip_norm
        record["noise_multiplier"] = state.noise_multiplier
        release_round(config, state, round_=current.round, q=current.sampling_q or 1.0,
                      selected=len(current.asked), participants=sorted(accepted),
                      clip_bits=bits, server_bits_noise=bits_noise)
        record["epsilon"] = state.epsilon
        logger.info("%s: round %d: epsilon %.4f at delta %g (%s, z %.3f, C %.4g -> %.4g)",
                    self.name, current.round, state.epsilon, config.delta, config.mode,
                    state.noise_multiplier, record["clip_norm"], state.clip_norm)

    def _early_stop(self, record: dict[str, Any]) -> str | None:
        accuracy = record.get("central_accuracy") or record.get("eval_accuracy")
        if accuracy is None:
            return None
        target = self.config.target_accuracy
        if target is not None and accuracy >= target:
            return f"target accuracy {target} reached ({accuracy:.4f})"
        if self.state.best_round_accuracy is None or accuracy > self.state.best_round_accuracy:
            self.state.best_round = record["round"]
            self.state.best_round_accuracy = accuracy
        best = self.state.best_accuracy
        if best is None or accuracy > best + self.config.min_delta:
            self.state.best_accuracy = accuracy
            self.state.stale_rounds = 0
        else:
            self.state.stale_rounds += 1
        if self.config.patience is not None and self.state.stale_rounds >= self.config.patience:
            return f"no improvement for {self.config.patience} rounds (plateau)"
        return None

    async def _finish(self, reason: str) -> None:
        self.state.state = TaskState.FINISHED
        self.state.message = reason
        self.state.current = None
        try:  # before the state is saved: a crash in between registers again (idempotent)
            registered = await off_loop(self._register_models)
            if registered:
                self.state.message = f"{reason}; registered {', '.join(registered)}"
        except Exception as exc:  # the task's result stands; the operator registers by hand
            self.health.error("fl_register_error")
            logger.exception("%s: the final model could not be registered", self.name)
            self.state.message = f"{reason}; model not registered: {exc}"[:1024]
        await off_loop(self._save)
        await self._republish()  # clears the retained plan, publishes the final status
        logger.info("%s: finished: %s", self.name, reason)

    async def _fail(self, why: str) -> None:
        """Mark the task failed with its reason (persisted when possible)."""
        self.state.state = TaskState.FAILED
        self.state.message = why[:1024]
        logger.error("%s: failed: %s", self.name, why)
        try:
            await off_loop(self._save)
            await self._republish()
        except Exception:  # the failure is already recorded in memory and in the log
            self.health.error("fl_fail_not_persisted")
            logger.exception("%s: the failure could not be persisted or published", self.name)

    def _register_models(self) -> list[str]:
        """Register the final weights (and the most accurate round's) in the model registry.

        With their lineage and figures (worker thread); returns ``model version`` names.

        The version is ``0.{round}.0``, with the patch raised past any version that a
        previous run of the same task registered with other weights.
        """
        if self.models is None or self.state.round == 0:
            return []
        model = self.config.model_name or self.name
        rounds = [(self.state.round, "final")]
        best = self.state.best_round
        if best is not None and best != self.state.round:
            rounds.append((best, f"best ({self.state.best_round_accuracy:.4f})"))
        elif best is not None:
            rounds[0] = (self.state.round, "final, best")
        recipe = {"strategy": self.strategy_name, "strategy_params": self.config.strategy_params,
                  "rounds": self.state.round, "hyperparams": self.config.hyperparams.model_dump(),
                  "task_kwargs": self.config.task_kwargs}
        names: list[str] = []
        for round_, note in rounds:
            path = self._weights_path(str(round_))
            if not path.exists():
                logger.warning("%s: weights of round %d are gone: not registered", self.name,
                               round_)
                continue
            data = path.read_bytes()
            status = self.fl_store.round_status(round_)
            figures = {} if status is None else {
                "central_accuracy": status.central_accuracy,
                "eval_accuracy": status.eval_accuracy, "train_loss": status.train_loss,
                "eval_loss": status.eval_loss}
            metrics = {k: v for k, v in figures.items() if v is not None}
            patch = 0
            while True:
                version = f"0.{round_}.{patch}"
                try:
                    self.models.register(
                        model, version, data, ArtifactFormat.WEIGHTS, task=self.config.task,
                        fl_task=self.name, fl_round=round_, recipe=recipe, note=note,
                        metrics=metrics, metrics_source="fl")
                    break
                except VersionExistsError:
                    patch += 1
            names.append(f"{model} {version}")
        return names


def _rejection(device_id: str, reason: str, detail: str) -> Rejection:
    reason = reason if reason.replace("_", "").replace("-", "").isalnum() and len(reason) <= 64 \
        else "bad_payload"
    return Rejection(device_id=device_id, reason=reason, detail=detail[:1024])


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
