"""The federated-learning coordinator of one task: a persisted state machine.

waiting -> round_open -> collecting -> aggregating -> evaluating -> released -> ...
-> finished (or failed). The state (round, deadline, selection, received
updates) is saved in the cloud's SQLite store at every step and accepted updates
are kept on disk, so a restart resumes the round with the updates already
received and the same deadline. Updates are validated before they touch the
aggregate (sender selected, round and base version, names/shapes/dtypes, finite,
norm bound, duplicates once); a rejected update gets a reason in the round's
record and never stops the round.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from cloud.fl.config import FLTaskConfig
from cloud.fl.registry import make_strategy
from cloud.fl.strategy import Strategy
from cloud.fl.validation import validate_update
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
    Rejection,
    RoundPlan,
    TaskState,
    TaskStatus,
    UpdateEnvelope,
)
from schemas.topics import Topics

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], Awaitable[None]]
_TRANSIENT = frozenset({TaskState.ROUND_OPEN, TaskState.AGGREGATING, TaskState.EVALUATING})


class RoundRecord(BaseModel):
    """Everything the coordinator knows about the open round (persisted)."""

    round: int
    attempt: int = 0
    global_version: str
    selected: list[str]
    evaluate: list[str]
    issued_at: float
    deadline: float
    accepted: dict[str, dict[str, float]] = Field(default_factory=dict)
    rejected: list[Rejection] = Field(default_factory=list)
    evals: dict[str, dict[str, float]] = Field(default_factory=dict)
    bytes_received: int = 0


class CoordinatorState(BaseModel):
    """The persisted state machine."""

    state: TaskState = TaskState.WAITING
    round: int = 0
    global_version: str = "0"
    current: RoundRecord | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    last_selected: dict[str, float] = Field(default_factory=dict)
    best_accuracy: float | None = None
    stale_rounds: int = 0
    message: str | None = None


class Coordinator:
    """Runs one task's rounds inside the cloud service."""

    def __init__(self, name: str, config: FLTaskConfig, *, topics: Topics, store: SqliteStore,
                 registry: DeviceRegistry, sinks: list[TelemetrySink], folder: Path,
                 publish: Publish, counters: Counter[str]) -> None:
        self.name = name
        self.config = config
        self.topics = topics
        self.store = store
        self.registry = registry
        self.sinks = sinks
        self.folder = folder
        self.publish = publish
        self.counters = counters
        self.task: FLTask = load_task(config.task, **config.task_kwargs)
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_params)
        self.rng = random.Random(config.seed)  # noqa: S311 - client sampling, not crypto
        self.key = f"fl:{name}"
        saved = store.get(self.key)
        self.state = CoordinatorState.model_validate(saved) if saved else CoordinatorState()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.global_weights: Weights = self._load_global()
        self._round_started = 0.0

    # -- persistence ------------------------------------------------------------------

    def _save(self) -> None:
        state = self.state
        if state.state in _TRANSIENT:
            # What a restart can resume: the round is collecting until it is released.
            state = state.model_copy(update={"state": TaskState.COLLECTING})
        self.store.put(self.key, state.model_dump(mode="json"))

    def _weights_path(self, version: str) -> Path:
        return self.folder / f"global-{version}.safetensors"

    def _update_dir(self, round_: int) -> Path:
        return self.folder / f"round-{round_}"

    def _load_global(self) -> Weights:
        path = self._weights_path(self.state.global_version)
        if path.exists():
            decoded = decode(path.read_bytes(), GlobalModelEnvelope)
            return {k: np.asarray(v, dtype=np.float32) for k, v in decoded.tensors.items()}
        weights = {k: v.astype(np.float32) for k, v in get_weights(self.task.build_model()).items()}
        self._write_global(self.state.global_version, weights, 0)
        return weights

    def _write_global(self, version: str, weights: Weights, round_: int) -> bytes:
        shared = {k: weights[k] for k in self.strategy.shared_names(weights)}
        payload = encode(shared, GlobalModelEnvelope(task=self.name, version=version,
                                                     round=round_, created_at=now()))
        path = self._weights_path(version)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(payload)
        tmp.replace(path)
        return payload

    # -- status -------------------------------------------------------------------------

    async def _publish_status(self, extra: dict[str, Any] | None = None) -> TaskStatus:
        last = self.state.history[-1] if self.state.history else {}
        status = TaskStatus.model_validate({
            "task": self.name, "state": self.state.state, "round": self.state.round,
            "rounds_total": self.config.rounds, "global_version": self.state.global_version,
            "participants": last.get("participants", []),
            "rejected": last.get("rejected", []),
            "train_loss": last.get("train_loss"), "eval_loss": last.get("eval_loss"),
            "eval_accuracy": last.get("eval_accuracy"),
            "central_accuracy": last.get("central_accuracy"),
            "fairness": last.get("fairness"), "bytes_received": last.get("bytes_received", 0),
            "duration_s": last.get("duration_s"), "message": self.state.message,
            "ts": now(), **(extra or {}),
        })
        await self.publish(self.topics.task_status(self.name), status.to_json(), True)
        return status

    # -- the state machine ------------------------------------------------------------

    async def start(self) -> None:
        """Publish the current global weights and status (after a restart too)."""
        payload = self._weights_path(self.state.global_version).read_bytes()
        await self.publish(self.topics.global_model(self.name, self.state.global_version),
                           payload, True)
        current = self.state.current
        if current is not None and self.state.state is TaskState.COLLECTING:
            self._resume_round(current)
            # The plan may not have left before a crash; publishing it again is idempotent.
            await self.publish(self.topics.round_plan(self.name), self._plan(current).to_json(),
                               True)
        await self._publish_status()

    async def tick(self) -> None:
        """Advance the state machine (called every few hundred ms)."""
        state = self.state.state
        if state in (TaskState.FINISHED, TaskState.FAILED):
            return
        if state in (TaskState.WAITING, TaskState.RELEASED):
            await self._maybe_open_round()
        elif state is TaskState.COLLECTING:
            current = self.state.current
            if current is None:
                return
            done = set(current.accepted) | {r.device_id for r in current.rejected}
            if set(current.selected) <= done or now() >= current.deadline:
                await self._close_round()

    def eligible(self) -> list[DeviceRecord]:
        """Online devices that can train this task now, per the selection policy."""
        sel = self.config.selection
        devices = [d for d in self.registry.devices(online=True)
                   if sel.runtime in d.runtimes
                   and (d.memory_available_mb or 0.0) >= sel.min_memory_mb]
        if sel.policy == "resource_aware":
            devices = [d for d in devices if self._resources_ok(d)]
        return devices

    def _resources_ok(self, device: DeviceRecord) -> bool:
        sel = self.config.selection
        rows = self.store.query(
            "SELECT cpu_percent, temperature_c, battery_percent, battery_plugged, "
            "network_latency_ms FROM telemetry WHERE device_id=? ORDER BY ts DESC LIMIT 1",
            (device.device_id,))
        if not rows:
            return False
        t = rows[0]
        battery_ok = t["battery_percent"] is None or t["battery_plugged"] == 1 \
            or t["battery_percent"] >= sel.min_battery_percent
        return bool(battery_ok
                    and (t["temperature_c"] is None or t["temperature_c"] <= sel.max_temperature_c)
                    and (t["cpu_percent"] or 0.0) <= sel.max_cpu_percent
                    and (t["network_latency_ms"] is None
                         or t["network_latency_ms"] <= sel.max_latency_ms))

    def select(self, devices: list[DeviceRecord]) -> tuple[list[str], list[str]]:
        """Devices to train and to evaluate this round."""
        ids = sorted(d.device_id for d in devices)
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

    async def _maybe_open_round(self, attempt: int = 0) -> None:
        if self.state.round >= self.config.rounds:
            await self._finish("all rounds done")
            return
        devices = self.eligible()
        if len(devices) < self.config.min_available_clients:
            if self.state.state is not TaskState.WAITING:
                self.state.state = TaskState.WAITING
                self._save()
                await self._publish_status()
            return
        selected, evaluate = self.select(devices)
        issued = now()
        round_ = self.state.round + 1
        record = RoundRecord(round=round_, attempt=attempt,
                             global_version=self.state.global_version, selected=selected,
                             evaluate=evaluate, issued_at=issued,
                             deadline=issued + self.config.round_timeout_s)
        for device_id in selected:
            self.state.last_selected[device_id] = issued
        self.state.current = record
        # Persisted as collecting (what a restart resumes); round_open is what others see.
        self.state.state = TaskState.COLLECTING
        self._save()
        self.state.state = TaskState.ROUND_OPEN
        await self._publish_status({"round": round_})
        self._begin(record)
        await self.publish(self.topics.round_plan(self.name), self._plan(record).to_json(), True)
        self.state.state = TaskState.COLLECTING
        logger.info("%s: round %d open: %d selected, deadline in %.0f s", self.name, round_,
                    len(selected), self.config.round_timeout_s)
        await self._publish_status({"round": round_, "participants": selected})

    def _plan(self, record: RoundRecord) -> RoundPlan:
        hp = self.config.hyperparams
        client_config = self.strategy.client_config()
        if "proximal_mu" in client_config:
            hp = hp.model_copy(update={"proximal_mu": float(client_config["proximal_mu"])})
        return RoundPlan(task=self.name, round=record.round,
                         global_version=record.global_version, selected=record.selected,
                         evaluate=record.evaluate, issued_at=record.issued_at,
                         deadline=record.deadline, strategy=self.strategy.name,
                         hyperparams=hp, compression=self.config.compression,
                         max_update_norm=self.config.max_update_norm)

    def _begin(self, record: RoundRecord) -> None:
        self._round_started = time.monotonic()
        self.strategy.begin_round(self.global_weights)
        self._update_dir(record.round).mkdir(parents=True, exist_ok=True)

    def _resume_round(self, record: RoundRecord) -> None:
        """After a restart: the same round, deadline and accepted updates."""
        self._begin(record)
        for device_id in sorted(record.accepted):
            path = self._update_dir(record.round) / f"{device_id}.safetensors"
            delta = self._delta(path.read_bytes())
            self.strategy.add(delta, record.accepted[device_id]["num_examples"])
        logger.info("%s: round %d resumed with %d update(s)", self.name, record.round,
                    len(record.accepted))

    # -- updates and evaluations -------------------------------------------------------

    def _delta(self, payload: bytes) -> Weights:
        size = sum(v.size for v in self.global_weights.values())
        decoded = decode(payload, UpdateEnvelope, DecodeLimits(max_bytes=max(1 << 20, size * 8)))
        return decompress(decoded.tensors, decoded.envelope.compression,
                          max_elements=size)

    def on_update(self, device_id: str, round_: int, payload: bytes) -> None:  # noqa: PLR0911
        """An update arrived on ``fl/{t}/rounds/{r}/updates/{d}``."""
        current = self.state.current
        if current is None or self.state.state is not TaskState.COLLECTING \
                or round_ != current.round:
            self._reject(current, device_id, "stale_round", f"round {round_} is not open")
            return
        if device_id not in current.selected:
            self._reject(current, device_id, "not_selected", "device was not selected")
            return
        if device_id in current.accepted:
            self.counters["fl_duplicate_update"] += 1  # QoS 1 redelivery: counted once
            return
        try:
            decoded = decode(payload, UpdateEnvelope,
                             DecodeLimits(max_bytes=max(1 << 20, 8 * sum(
                                 v.size for v in self.global_weights.values()))))
            envelope = decoded.envelope
            if (envelope.device_id, envelope.round, envelope.task) != (device_id, round_,
                                                                        self.name):
                self._reject(current, device_id, "envelope_mismatch",
                             "envelope names another device, round or task")
                return
            if envelope.base_version != current.global_version:
                self._reject(current, device_id, "stale_base",
                             f"trained from {envelope.base_version}, round uses "
                             f"{current.global_version}")
                return
            delta = decompress(decoded.tensors, envelope.compression,
                               max_elements=sum(v.size for v in self.global_weights.values()))
        except (DecodeError, CompressionError) as exc:
            self._reject(current, device_id, getattr(exc, "reason", "bad_payload"), str(exc))
            return
        problem = validate_update(delta, self.global_weights,
                                  names=self.strategy.shared_names(self.global_weights),
                                  max_norm=self.config.max_update_norm)
        if problem is not None:
            self._reject(current, device_id, problem.reason.value, problem.detail)
            return
        self.strategy.add(delta, envelope.num_examples)
        path = self._update_dir(round_) / f"{device_id}.safetensors"
        path.write_bytes(payload)
        current.accepted[device_id] = {
            "num_examples": float(envelope.num_examples),
            "train_loss": float(envelope.train_loss if envelope.train_loss is not None
                                else float("nan")),
            "train_accuracy": float(envelope.train_accuracy
                                    if envelope.train_accuracy is not None else float("nan")),
            "bytes": float(len(payload)),
            "train_time_s": float(envelope.train_time_s or 0.0),
        }
        current.bytes_received += len(payload)
        self._save()

    def _reject(self, current: RoundRecord | None, device_id: str, reason: str,
                detail: str) -> None:
        self.counters[f"fl_rejected_{reason}"] += 1
        logger.warning("%s: update from %s rejected: %s: %s", self.name, device_id, reason,
                       detail)
        if current is not None:
            current.rejected.append(Rejection(device_id=device_id, reason=reason,
                                              detail=detail[:1024]))
            self._save()

    def on_eval(self, device_id: str, round_: int, payload: bytes) -> None:
        """A federated evaluation result arrived."""
        current = self.state.current
        try:
            result = decode_message(EvalResult, payload)
        except DecodeError as exc:
            self.counters[f"fl_refused_eval_{exc.reason}"] += 1
            return
        if current is None or round_ != current.round or device_id not in current.evaluate \
                or result.device_id != device_id:
            self.counters["fl_refused_eval_unexpected"] += 1
            return
        current.evals[device_id] = {"loss": result.loss, "accuracy": result.accuracy or 0.0,
                                    "num_examples": float(result.num_examples)}
        self._save()

    # -- closing a round ------------------------------------------------------------------

    async def _close_round(self) -> None:
        current = self.state.current
        if current is None:
            return
        if len(current.accepted) < self.config.min_fit_clients:
            why = (f"round {current.round}: {len(current.accepted)} update(s), fewer than "
                   f"min_fit_clients={self.config.min_fit_clients}")
            if self.config.accept_failures and current.attempt < self.config.max_round_retries:
                logger.warning("%s: %s; retrying the round", self.name, why)
                self.state.message = why + "; retrying"
                self.state.state = TaskState.RELEASED
                self._save()
                await self._maybe_open_round(attempt=current.attempt + 1)
                return
            self.state.state = TaskState.FAILED
            self.state.message = why
            self._save()
            await self._publish_status()
            return
        # Aggregating and evaluating are not persisted: until the round is released the
        # saved state is still `collecting`, and a restart re-aggregates the stored updates.
        self.state.state = TaskState.AGGREGATING
        await self._publish_status()
        new_weights = self.strategy.finalize()
        version = str(current.round)
        payload = self._write_global(version, new_weights, current.round)
        old_version = self.state.global_version
        self.global_weights = new_weights
        self.state.global_version = version
        self.state.round = current.round
        await self.publish(self.topics.global_model(self.name, version), payload, True)
        if old_version != version:  # retained weights live in broker RAM: clear the old ones
            await self.publish(self.topics.global_model(self.name, old_version), b"", True)
        self.state.state = TaskState.EVALUATING
        record = self._record(current, new_weights)
        self.state.history.append(record)
        self.state.current = None
        self.state.message = None
        stop_reason = self._early_stop(record)
        self.state.state = TaskState.RELEASED
        self._save()
        status = await self._publish_status()
        for sink in self.sinks:
            sink.write_fl_round(status)
        if stop_reason is not None:
            await self._finish(stop_reason)

    def _record(self, current: RoundRecord, weights: Weights) -> dict[str, Any]:
        accepted = current.accepted
        total = sum(a["num_examples"] for a in accepted.values())
        losses = [a["train_loss"] * a["num_examples"] for a in accepted.values()
                  if not np.isnan(a["train_loss"])]
        central_acc = central_loss = None
        central = self.task.central_data()
        if central is not None:
            result = self.task.evaluate(weights, central[0], central[1])
            central_acc, central_loss = result.accuracy, result.loss
        evals = current.evals
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
            "participants": sorted(accepted),
            "rejected": [r.model_dump() for r in current.rejected],
            "train_loss": sum(losses) / total if losses and total else None,
            "eval_loss": (sum(e["loss"] * e["num_examples"] for e in evals.values()) / eval_total
                          if eval_total else central_loss),
            "eval_accuracy": (sum(e["accuracy"] * e["num_examples"] for e in evals.values())
                              / eval_total if eval_total else None),
            "central_accuracy": central_acc,
            "fairness": fairness,
            "bytes_received": current.bytes_received,
            "duration_s": max(0.0, now() - current.issued_at),
            "slowest_client_s": max((a.get("train_time_s", 0.0) for a in accepted.values()),
                                    default=0.0),
        }

    def _early_stop(self, record: dict[str, Any]) -> str | None:
        accuracy = record.get("central_accuracy") or record.get("eval_accuracy")
        if accuracy is None:
            return None
        target = self.config.target_accuracy
        if target is not None and accuracy >= target:
            return f"target accuracy {target} reached ({accuracy:.4f})"
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
        self._save()
        self._register_model()
        await self.publish(self.topics.round_plan(self.name), b"", True)
        await self._publish_status()
        logger.info("%s: finished: %s", self.name, reason)

    def _register_model(self) -> None:
        """Record the final model with its lineage, for optimisation and release."""
        registry = self.store.get("model_registry") or {}
        last = self.state.history[-1] if self.state.history else {}
        registry[f"{self.name}:{self.state.global_version}"] = {
            "task": self.name, "task_path": self.config.task, "version": self.state.global_version,
            "rounds": self.state.round, "strategy": self.strategy.name,
            "weights": str(self._weights_path(self.state.global_version)),
            "metrics": {k: last.get(k) for k in ("central_accuracy", "eval_accuracy",
                                                 "train_loss")},
            "registered_at": now(),
        }
        self.store.put("model_registry", json.loads(json.dumps(registry)))
