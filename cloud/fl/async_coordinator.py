"""The asynchronous buffered coordinator of one task (FedBuff, Nguyen et al. 2022).

A task with ``mode: async`` has no rounds. Up to ``fedbuff.concurrency`` online
members hold an assignment (a numbered ticket) at once; each trains from the newest
global version it holds and sends its update under its ticket. Every accepted
update joins a buffer, scaled by ``1 / (1 + staleness) ** a`` (staleness: versions
released since the one it trained from) and weighted by its examples; the
``buffer_size``-th makes the next global version, published retained like a
synchronous round's. A slot frees when its update arrives (accepted or refused),
when its deadline (``round_timeout_s``) passes, and, for the concurrency count,
while its device is offline (its update is still taken if it comes back in time).

The same owner task, inbox, validation and persistence as the synchronous
:class:`~cloud.fl.coordinator.Coordinator`: an accepted update is a file plus a row
filed under the version it will make, the assignments are part of the small state
record, and a restart re-adds the buffered updates, so a SIGKILL with a half-full
buffer resumes it with nothing lost and nothing counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloud.files import write_atomic
from cloud.fl.coordinator import (
    _DONE,
    MAX_FUTURE_SKEW_S,
    Coordinator,
    CoordinatorState,
    RoundRecord,
    _rejection,
    _remove_tree,
    _Round,
)
from cloud.fl.validation import validate_update
from cloud.offload import off_loop
from fl_tasks.base import Weights
from schemas.base import now
from schemas.fl import Rejection, RoundPlan, TaskState, TaskStatus, UpdateEnvelope, split_control
from schemas.topics import TopicKind

logger = logging.getLogger(__name__)


class Assignment(BaseModel):
    """One device's open assignment."""

    model_config = ConfigDict(extra="forbid")

    ticket: int = Field(ge=1)
    base: int = Field(ge=0, description="The newest version when it was assigned")
    assigned_at: float
    deadline: float


class BufferState(BaseModel):
    """The asynchronous part of the persisted record."""

    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(default_factory=lambda: secrets.token_hex(16),
                       description="Drawn when the task starts; every update echoes it")
    next_ticket: int = Field(default=1, ge=1)
    training: dict[str, Assignment] = Field(default_factory=dict)
    answered: dict[str, int] = Field(
        default_factory=dict, description="Each device's last answered ticket (a redelivery "
        "of it is a duplicate, not a refusal)")
    opened_at: float = Field(default_factory=now, description="When the buffer of the "
                             "next version started filling")


class AsyncCoordinatorState(CoordinatorState):
    """The synchronous record, plus the buffer's assignments."""

    fedbuff: BufferState = Field(default_factory=BufferState)


def staleness_scale(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial staleness scale ``1 / (1 + s) ** a``."""
    return float((1.0 + staleness) ** -exponent)


class AsyncCoordinator(Coordinator):
    """Runs one task in FedBuff mode inside the cloud service."""

    state_model = AsyncCoordinatorState
    state: AsyncCoordinatorState

    @property
    def buffer(self) -> BufferState:
        """The buffer's assignments (persisted with the state)."""
        return self.state.fedbuff

    def _next_version(self) -> int:
        return self.state.round + 1

    # -- loading (worker thread) ---------------------------------------------------------

    def _load(self) -> None:
        super()._load()
        if self.state.state not in _DONE:
            self._resume_buffer()

    def _resume_buffer(self) -> None:
        """The buffer of the next version as it was stored (after a restart or at start)."""
        self.strategy.configure_population(self.config.fedbuff.buffer_size)
        self.strategy.configure_training(self.config.hyperparams.momentum)
        self.strategy.begin_round(self.global_weights)
        version = self._next_version()
        stored = self.fl_store.updates(version)
        for key in sorted(stored):
            meta = stored[key]
            delta = self._delta((self._update_dir(version) / f"{key}.safetensors").read_bytes())
            self.strategy.add(_scaled(split_control(delta)[0], meta["scale"]),
                              meta["num_examples"], local_steps=meta.get("local_steps"))
            device, ticket = meta["device_id"], int(meta["ticket"])
            held = self.buffer.training.get(device)
            if held is not None and held.ticket == ticket:
                # Stored, then killed before the assignment was closed in the record.
                del self.buffer.training[device]
                self.buffer.answered[device] = ticket
        rejections = self.fl_store.rejections(version)
        self.round = _Round(accepted=stored, counts=Counter(rejections.counts),
                            examples=rejections.examples)
        if stored:
            logger.info("%s: version %d: buffer resumed with %d update(s)", self.name, version,
                        len(stored))

    # -- the state machine (owner task) ------------------------------------------------------

    async def _tick(self) -> None:
        if self.state.state in _DONE:
            return
        if self.state.round >= self.config.rounds:
            await self._finish("all versions released")
            return
        if len(self.round.accepted) >= self.config.fedbuff.buffer_size:
            await self._release()  # a full buffer stored by a process that was killed
            return
        changed = self._expire()
        started = await self._start_when_enough()
        if self.state.state is TaskState.COLLECTING:
            changed = self._assign() or changed
        if changed or started:
            await off_loop(self._save)
            await self._republish_plan()

    async def _start_when_enough(self) -> bool:
        """Waiting: start once ``min_available_clients`` members are eligible."""
        if self.state.state is not TaskState.WAITING:
            return False
        if len(self.eligible()) < self.config.min_available_clients:
            return False
        self.state.state = TaskState.COLLECTING
        self.buffer.opened_at = now()
        logger.info("%s: asynchronous training started (buffer %d, concurrency %d, max "
                    "staleness %d)", self.name, self.config.fedbuff.buffer_size,
                    self.config.fedbuff.concurrency, self.config.fedbuff.max_staleness)
        return True

    def _expire(self) -> bool:
        """Close the assignments past their deadline; True if any was."""
        t = now()
        late = [d for d, a in self.buffer.training.items() if t >= a.deadline]
        for device_id in late:
            del self.buffer.training[device_id]
            self.counters["fl_async_assignment_expired"] += 1
            logger.info("%s: assignment of %s expired", self.name, device_id)
        return bool(late)

    def _assign(self) -> bool:
        """Fill the free slots with idle eligible devices; True if any was assigned."""
        training = self.buffer.training
        online = {d.device_id for d in self.registry.devices(online=True)}
        free = self.config.fedbuff.concurrency - sum(1 for d in training if d in online)
        if free <= 0:
            return False
        idle = [d for d in self.eligible() if d.device_id not in training]
        if not idle:
            return False
        chosen, _ = self.select(idle, min(free, len(idle)))
        t = now()
        for device_id in chosen:
            training[device_id] = Assignment(
                ticket=self.buffer.next_ticket, base=self.state.round, assigned_at=t,
                deadline=t + self.config.round_timeout_s)
            self.buffer.next_ticket += 1
            self.state.last_selected[device_id] = t
        return True

    async def _republish_plan(self) -> None:
        plan = self._retained_plan()
        if plan is not None:
            await self._send(self.topics.round_plan(self.name), plan.to_json())
        await self._publish_status()

    def _retained_plan(self) -> RoundPlan | None:
        if self.state.state is not TaskState.COLLECTING:
            return None
        training = self.buffer.training
        t = now()
        deadline = max([a.deadline for a in training.values()] + [t + 1.0])
        record = RoundRecord(round=self._next_version(), global_version=self.state.global_version,
                             nonce=self.buffer.nonce, selected=sorted(training), evaluate=[],
                             issued_at=t, deadline=deadline)
        plan = self._plan(record)
        return RoundPlan.model_validate({**plan.model_dump(), "mode": "async",
                                         "tickets": {d: a.ticket for d, a in training.items()}})

    # -- updates (owner task) ----------------------------------------------------------------

    def _filed_under(self, round_: int) -> int | None:
        return self._next_version()  # every refusal counts in the buffer being filled

    async def _on_update(self, device_id: str, round_: int, payload: bytes) -> None:
        ticket = round_
        if self.state.state in _DONE:
            await self._reject(ticket, device_id, "task_ended",
                               f"the task is {self.state.state.value}")
            return
        key = _key(device_id, ticket)
        if key in self.round.accepted or self.buffer.answered.get(device_id) == ticket:
            self.health.duplicate(TopicKind.UPDATE.value, flat="fl_duplicate_update")
            return
        assignment = self.buffer.training.get(device_id)
        if assignment is None or assignment.ticket != ticket:
            await self._reject(ticket, device_id, "not_assigned",
                               f"no open assignment {ticket} for the device")
            return
        outcome = await off_loop(self._accept_async, device_id, ticket, payload)
        del self.buffer.training[device_id]  # answered, either way: the slot is free
        self.buffer.answered[device_id] = ticket
        if isinstance(outcome, Rejection):
            await self._reject(ticket, device_id, outcome.reason, outcome.detail or "")
            await off_loop(self._save)
            return
        self.round.accepted[key] = outcome
        self.health.accept(TopicKind.UPDATE.value)
        if len(self.round.accepted) >= self.config.fedbuff.buffer_size:
            await self._release()
        else:
            await off_loop(self._save)

    def _accept_async(self, device_id: str, ticket: int, payload: bytes,
                      ) -> dict[str, Any] | Rejection:
        """Decode, validate, store and add one update to the buffer (worker thread)."""
        opened = self._opened(device_id, payload,
                              lambda e: self._stale(device_id, ticket, e))
        if isinstance(opened, Rejection):
            return opened
        envelope, delta = opened
        staleness = self.state.round - int(envelope.base_version)
        delta, control = split_control(delta)
        if control:
            return _rejection(device_id, "extra_tensor",
                              f"control variates sent to a {self.strategy_name} task")
        names = self.strategy.shared_names(self.global_weights)
        problem = validate_update(delta, self.global_weights, names=names,
                                  max_norm=self.config.max_update_norm)
        if problem is not None:
            return problem.to_wire(device_id)
        version = self._next_version()
        key = _key(device_id, ticket)
        directory = self._update_dir(version)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{key}.safetensors", payload)
        scale = staleness_scale(staleness, self.config.fedbuff.staleness_exponent)
        meta = {
            "device_id": device_id, "ticket": ticket, "staleness": staleness, "scale": scale,
            "base_version": envelope.base_version,
            "num_examples": float(envelope.num_examples),
            "train_loss": envelope.train_loss, "train_accuracy": envelope.train_accuracy,
            "bytes": float(len(payload)), "train_time_s": float(envelope.train_time_s or 0.0),
            "attempt": 0, "sha256": hashlib.sha256(payload).hexdigest(),
            "local_steps": envelope.local_steps, "sent_at": envelope.sent_at,
        }
        self.fl_store.add_update(version, key, 0, meta)
        self.strategy.add(_scaled(delta, scale), envelope.num_examples,
                          local_steps=envelope.local_steps)
        return meta

    def _stale(self, device_id: str, ticket: int, envelope: UpdateEnvelope,
               ) -> Rejection | None:
        """Why the update does not answer its assignment, or is too stale (None: fine)."""
        if (envelope.device_id, envelope.round, envelope.task) != (device_id, ticket, self.name):
            return _rejection(device_id, "envelope_mismatch",
                              "envelope names another device, ticket or task")
        if envelope.nonce != self.buffer.nonce:
            return _rejection(device_id, "stale_nonce",
                              "the update answers another run of this task (a replay, or "
                              "an update queued before the task was started again)")
        base = envelope.base_version
        if not base.isdigit() or int(base) > self.state.round:
            return _rejection(device_id, "stale_base",
                              f"trained from {base}, which this task never released")
        staleness = self.state.round - int(base)
        limit = self.config.fedbuff.max_staleness
        if staleness > limit:
            return _rejection(device_id, "too_stale",
                              f"trained from version {base}, {staleness} versions behind "
                              f"{self.state.global_version} (max_staleness {limit})")
        if envelope.sent_at > now() + MAX_FUTURE_SKEW_S:
            return _rejection(device_id, "future_timestamp",
                              f"sent_at {envelope.sent_at:.0f} is ahead of the cloud's clock")
        return None

    # -- releasing a version ---------------------------------------------------------------------

    async def _release(self) -> None:
        """The buffer is full: the next global version, retained; the buffer starts over."""
        self.state.state = TaskState.AGGREGATING
        await self._publish_status()
        number = self._next_version()
        weights, record = await off_loop(self._aggregate_buffer, number)
        old_version = self.state.global_version
        self.global_weights = weights
        self.state.global_version = str(number)
        self.state.round = number
        self.state.last = record
        self.state.message = None
        if old_version != self.state.global_version:
            self.state.uncleared.append(old_version)
        stop_reason = self._early_stop(record)
        self.state.state = TaskState.RELEASED
        status = self.status()
        self.state.state = TaskState.COLLECTING
        self.buffer.opened_at = now()
        self.round = _Round()
        releasing = time.monotonic()
        await off_loop(self._commit_release, status, weights)
        for sink in self.sinks:
            if sink is not self.store:
                await off_loop(sink.write_fl_round, status)
        await self._republish()
        self._timed(number, release_s=time.monotonic() - releasing)
        await off_loop(_remove_tree,
                       self._update_dir(number - self.config.keep_update_rounds))
        await off_loop(self._prune_versions)
        if stop_reason is not None:
            await self._finish(stop_reason)

    def _commit_release(self, status: TaskStatus, weights: Weights) -> None:
        """Record the version and the new state in one transaction; open the next buffer."""
        self.fl_store.release(self._saved_state(), status)
        self.strategy.begin_round(weights)

    def _aggregate_buffer(self, number: int) -> tuple[Weights, dict[str, Any]]:
        """Aggregate the buffer, evaluate, write the new global weights (worker thread)."""
        started = time.monotonic()
        weights = self.strategy.finalize()
        self._write_global(str(number), weights, number)
        aggregated = time.monotonic()
        opened = self.buffer.opened_at
        record = self._record(RoundRecord(round=number, global_version=str(number),
                                          nonce=self.buffer.nonce, selected=[], evaluate=[],
                                          issued_at=opened, deadline=opened + 1.0), weights)
        self._timed(number, issued_at=opened, aggregate_s=aggregated - started,
                    evaluate_s=time.monotonic() - aggregated)
        metas = list(self.round.accepted.values())
        record["participants"] = sorted({str(m["device_id"]) for m in metas})
        staleness = [int(m["staleness"]) for m in metas]
        record["staleness_mean"] = statistics.fmean(staleness)
        record["staleness_max"] = max(staleness)
        record["updates"] = len(metas)
        logger.info("%s: version %d from %d update(s), staleness mean %.2f max %d", self.name,
                    number, len(metas), record["staleness_mean"], record["staleness_max"])
        return weights, record

    # -- status ------------------------------------------------------------------------------------

    def status(self, **extra: Any) -> TaskStatus:
        """The task's status, with the buffer's assignments, fill and staleness."""
        last = self.state.last or {}
        fields: dict[str, Any] = {
            "mode": "async", "training": len(self.buffer.training),
            "buffered": len(self.round.accepted),
            "staleness_mean": last.get("staleness_mean"),
            "staleness_max": last.get("staleness_max"),
            "rejected_counts": dict(self.round.counts),
            "rejected": [r.model_dump() for r in self.round.examples[-20:]],
        }
        return super().status(**(fields | extra))


def _key(device_id: str, ticket: int) -> str:
    """A buffered update's name: a device may have several tickets in one buffer."""
    return f"{device_id}@{ticket}"


def _scaled(delta: Weights, scale: float) -> Weights:
    if scale == 1.0:
        return delta
    factor = np.float32(scale)
    return {k: (v * factor).astype(np.float32) for k, v in delta.items()}

