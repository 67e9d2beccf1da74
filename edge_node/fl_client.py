"""The device side of federated learning.

On a retained round plan that selects this device, the client fetches the global
weights (retained ``fl/{t}/global/{version}``), trains the task's model on local
data, and publishes the compressed delta with its envelope; on a plan that asks it
to evaluate, it evaluates the global model on local data. Training runs on its
own thread, so telemetry and inference never wait for it. A device that misses
the deadline drops its late update and counts it. FedBN: names missing from the
global weights (batch-norm layers) are taken from the device's own last weights.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from edge_node.attacks import AttackSettings, poison, tamper
from edge_node.counters import Counters
from edge_node.errors import EdgeError, PacketTooLargeError
from edge_node.job_thread import JobThread
from edge_node.secagg_client import SecAggClient
from edge_node.settings import FLSettings
from fl_tasks.base import (
    FLTask,
    LocalData,
    Partition,
    TrainResult,
    Weights,
    load_task,
    momentum_steps,
)
from fl_tasks.errors import TaskError
from schemas.base import decode_message, now
from schemas.codec import DecodeLimits, decode, encode
from schemas.compression import compress
from schemas.errors import DecodeError
from schemas.fl import (
    EvalResult,
    GlobalModelEnvelope,
    PrivacySpec,
    RoundPlan,
    UpdateEnvelope,
    split_control,
    with_control,
)
from schemas.topics import TopicKind, Topics

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]
Subscribe = Callable[[str, bool], None]


@dataclass
class TaskState:
    """What the client keeps per task."""

    task: FLTask
    data: LocalData
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    local_weights: Weights = field(default_factory=dict)
    trained: set[tuple[int, int]] = field(default_factory=set)
    """(round, attempt) pairs trained: a retried round is a new request."""
    evaluated_rounds: set[int] = field(default_factory=set)
    plan: RoundPlan | None = None
    weights: dict[str, Weights] = field(default_factory=dict)
    attack: AttackSettings | None = None
    server_control: dict[str, Weights] = field(default_factory=dict)
    """SCAFFOLD: the server's control variate sent with each global version."""
    control: Weights | None = None
    """SCAFFOLD: this device's control variate c_i (loaded from its file when needed)."""


class FLClient:
    """Federated rounds for the tasks in ``settings``."""

    def __init__(self, device_id: str, topics: Topics, settings: FLSettings, *,
                 publish: Publish, subscribe: Subscribe, counters: Counters,
                 state_dir: Path | None = None) -> None:
        self.device_id = device_id
        self.state_dir = state_dir
        self.topics = topics
        self.settings = settings
        self._publish = publish
        self._subscribe = subscribe
        self.counters = counters
        self.tasks: dict[str, TaskState] = {}
        for name, config in settings.tasks.items():
            task = load_task(config.path, **config.options)
            partition = Partition(index=config.partition, count=config.partitions,
                                  scheme=config.scheme, alpha=config.alpha,
                                  seed=config.seed)
            data = task.local_data(partition)
            if config.attack is not None:
                logger.warning("%s: simulated attacker of %s (%s)", device_id, name,
                               config.attack.kind)
                data = poison(data, config.attack)
            self.tasks[name] = TaskState(task, data, attack=config.attack)
        # TaskError: _train handles a failed training itself (counted, a warning); this
        # covers the rest, e.g. global weights that do not fit the model on evaluation.
        self._jobs = JobThread(f"fl-{device_id}", "fl", counters,
                               (EdgeError, TaskError, DecodeError, ValueError, RuntimeError,
                                OSError))
        self.updates_sent = 0
        self._halt = threading.Event()
        self.secagg: SecAggClient | None = None
        if settings.secagg is not None:
            self.secagg = SecAggClient(device_id, topics, settings.secagg, publish=publish,
                                       counters=counters)

    def filters(self) -> list[str]:
        """Round plans of the configured tasks (and their secure-aggregation stages)."""
        out = [self.topics.filter(TopicKind.ROUND_PLAN, task=name) for name in self.tasks]
        if self.secagg is not None:
            out += self.secagg.filters(sorted(self.tasks))
        return out

    def start(self) -> None:
        """Start the training thread (and the secure-aggregation one)."""
        self._jobs.start()
        if self.secagg is not None:
            self.secagg.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, end the threads."""
        self._halt.set()
        self._jobs.stop(timeout)
        if self.secagg is not None:
            self.secagg.stop(timeout)

    # -- messages (network thread) -------------------------------------------------

    def on_round_plan(self, task: str, payload: bytes) -> None:
        """A retained round plan arrived."""
        self._jobs.put(lambda: self._plan(task, payload))

    def on_global_weights(self, task: str, version: str, payload: bytes) -> None:
        """Global weights arrived."""
        self._jobs.put(lambda: self._weights(task, version, payload))

    def on_secagg(self, kind: TopicKind, task: str, round_: int, stage: str,
                  payload: bytes) -> None:
        """A secure-aggregation stage of a round (roster, inbox, survivors)."""
        if self.secagg is not None and task in self.tasks:
            self.secagg.on_message(kind, task, round_, stage, payload)
        else:
            self.counters.add("fl_secagg_unexpected")

    # -- training thread -----------------------------------------------------------

    def _plan(self, task: str, payload: bytes) -> None:
        state = self.tasks.get(task)
        if state is None or not payload:
            return
        try:
            plan = decode_message(RoundPlan, payload)
        except DecodeError as exc:
            self.counters.add("fl_refused_plan")
            logger.warning("%s: refused round plan of %s: %s", self.device_id, task, exc)
            return
        if self.device_id not in plan.selected and self.device_id not in plan.evaluate:
            return
        done = _job(plan, self.device_id) in state.trained
        if done and (plan.mode == "async" or plan.round in state.evaluated_rounds):
            return
        if now() >= plan.deadline:
            # A retained plan of a round that is over (a restart, a late reconnect).
            self.counters.add("fl_plan_expired")
            logger.info("%s: round %d of %s is past its deadline; not training",
                        self.device_id, plan.round, task)
            return
        if plan.issued_at > now() + self.settings.max_clock_skew_s:
            self.counters.add("fl_clock_skew")
            logger.warning("%s: round %d of %s was issued %.0f s in this device's future: "
                           "check the clock", self.device_id, plan.round, task,
                           plan.issued_at - now())
        if plan.secagg is not None and self.device_id in plan.selected and not done:
            if self.secagg is None:
                self.counters.add("fl_secagg_not_provisioned")
                logger.warning("%s: round %d of %s aggregates securely and this device has "
                               "no identity key (fl.secagg settings): not training",
                               self.device_id, plan.round, task)
                return
            self.secagg.begin(task, plan)
        state.plan = plan
        if plan.global_version in state.weights:
            self._work(task, state)
        else:
            self._subscribe(self.topics.global_model(task, plan.global_version), True)

    def _weights(self, task: str, version: str, payload: bytes) -> None:
        state = self.tasks.get(task)
        if state is None or not payload:
            return
        limits = DecodeLimits(max_bytes=self.settings.max_weights_bytes)
        try:
            decoded = decode(payload, GlobalModelEnvelope, limits)
        except DecodeError as exc:
            self.counters.add("fl_refused_weights")
            logger.warning("%s: refused global weights %s/%s: %s", self.device_id, task,
                           version, exc)
            return
        self._subscribe(self.topics.global_model(task, version), False)
        weights, control = split_control(decoded.tensors)
        state.weights = {version: {k: np.asarray(v, dtype=np.float32)
                                   for k, v in weights.items()}}
        state.server_control = {version: {k: np.asarray(v, dtype=np.float32)
                                          for k, v in control.items()}}
        if state.plan is not None and state.plan.global_version == version:
            self._work(task, state)

    def _work(self, task: str, state: TaskState) -> None:
        plan = state.plan
        if plan is None:
            return
        shared = state.weights[plan.global_version]
        # FedBN and friends: names the cloud does not send stay the device's own.
        merged: Weights = dict(state.local_weights) if state.local_weights else {}
        if not merged:
            merged = dict(_initial(state.task))
        merged.update(shared)
        if self.device_id in plan.evaluate and plan.round not in state.evaluated_rounds:
            state.evaluated_rounds.add(plan.round)
            data = state.data
            result = state.task.evaluate(merged, data.x_eval, data.y_eval)
            message = EvalResult(task=task, round=plan.round, device_id=self.device_id,
                                 global_version=plan.global_version, nonce=plan.nonce,
                                 num_examples=max(1, result.num_examples),
                                 loss=max(0.0, result.loss), accuracy=result.accuracy, ts=now())
            self._publish(self.topics.eval_result(task, plan.round, self.device_id),
                          message.to_json())
        key = _job(plan, self.device_id)
        if self.device_id in plan.selected and key not in state.trained:
            state.trained.add(key)
            if now() >= plan.deadline:
                self.counters.add("fl_plan_expired")
                return
            self._train(task, state, plan, shared, merged)

    def _train(self, task: str, state: TaskState, plan: RoundPlan, shared: Weights,
               merged: Weights) -> None:
        started = time.monotonic()
        number = _job(plan, self.device_id)[0]  # the round, or the async ticket
        tag = f"t{number}" if plan.mode == "async" else str(number)
        seed = zlib.crc32(f"{self.device_id}/{task}/{tag}".encode())
        scaffold = plan.strategy == "scaffold"
        correction = self._correction(task, state, plan, shared) if scaffold else None
        try:
            result = state.task.train(merged, state.data, plan.hyperparams, seed=seed,
                                      correction=correction)
        except TaskError as exc:
            # A diverged training (non-finite loss) or weights that do not fit: this
            # round gets no update from here; the coordinator's deadline covers it.
            self.counters.add(f"fl_{exc.reason}")
            logger.warning("%s: round %s of %s: training failed: %s", self.device_id, tag,
                           task, exc)
            return
        if not self._simulate(task, plan, result):
            return
        state.local_weights = dict(result.weights)
        delta = {name: (result.weights[name] - shared[name]).astype(np.float32)
                 for name in shared}
        new_control: Weights | None = None
        if correction is not None:
            new_control, control_delta = self._next_control(state, plan, delta, correction,
                                                            result.num_examples)
            delta = with_control(delta, control_delta)
        if state.attack is not None:
            delta = tamper(delta, state.attack, np.random.default_rng(seed))
        clip_bit = None
        if plan.privacy is not None:
            delta, clip_bit = privatize(delta, plan.privacy)
        if plan.secagg is not None:
            if self.secagg is not None and now() <= plan.deadline:
                self.secagg.submit_update(task, plan, delta)
                self.updates_sent += 1
            else:
                self.counters.add("fl_late_update_dropped")
            return
        packed = compress(delta, plan.compression.kind,
                          topk_fraction=plan.compression.topk_fraction,
                          residual=state.residual or None)
        state.residual = dict(packed.residual)
        if now() > plan.deadline:
            self.counters.add("fl_late_update_dropped")
            logger.warning("%s: round %d of %s: training ended after the deadline; update "
                           "dropped", self.device_id, plan.round, task)
            return
        envelope = UpdateEnvelope(
            task=task, round=number, attempt=plan.attempt, device_id=self.device_id,
            base_version=plan.global_version, nonce=plan.nonce,
            num_examples=max(1, result.num_examples),
            train_loss=max(0.0, result.loss), train_accuracy=result.accuracy,
            train_time_s=time.monotonic() - started, compression=plan.compression.kind,
            clip_norm=plan.privacy.clip_norm if plan.privacy else None, clip_bit=clip_bit,
            local_steps=plan.hyperparams.local_epochs * math.ceil(
                max(1, result.num_examples) / plan.hyperparams.batch_size),
            sent_at=now(),
        )
        try:
            self._publish(self.topics.update(task, number, self.device_id),
                          encode(packed.tensors, envelope))
        except PacketTooLargeError as exc:
            self.counters.add("fl_update_too_large")
            logger.warning("%s: round %d of %s: update not sent: %s (compress it: "
                           "int8 or top-k)", self.device_id, plan.round, task, exc)
            return
        if new_control is not None:
            self._save_control(task, state, new_control)
        self.updates_sent += 1

    def _simulate(self, task: str, plan: RoundPlan, result: TrainResult) -> bool:
        """A simulated slow or unreliable device (``fleet --profile``); False: drop it.

        A device ``speed_factor`` times slower takes that many times the processor time
        the training took here (not its wall time: the simulated devices share this
        machine's cores, and waiting for them is not the device's slowness).
        """
        sim = self.settings.simulation
        if sim is None:
            return True
        number, attempt = _job(plan, self.device_id)
        draw = random.Random(f"{sim.seed}/{task}/{number}/{attempt}")  # noqa: S311
        if draw.random() < sim.failure_rate:
            self.counters.add("fl_simulated_failure")
            logger.info("%s: round %d of %s: simulated failure, no update", self.device_id,
                        plan.round, task)
            return False
        if sim.speed_factor > 1:  # the rest of the time a slower processor would take
            busy = result.cpu_seconds or result.seconds
            self._halt.wait(max(0.0, sim.speed_factor * busy - result.seconds))
        return not self._halt.is_set()

    # -- SCAFFOLD ----------------------------------------------------------------

    def _control_path(self, task: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / task / "control.safetensors"

    def _correction(self, task: str, state: TaskState, plan: RoundPlan,
                    shared: Weights) -> Weights:
        """``c - c_i`` for every shared name (zeros where either was never set)."""
        if state.control is None:
            state.control = self._load_control(task)
        server = state.server_control.get(plan.global_version, {})
        return {name: (server.get(name, zero) - state.control.get(name, zero)).astype(np.float32)
                for name, value in shared.items()
                for zero in (np.zeros(value.shape, np.float32),)}

    def _next_control(self, state: TaskState, plan: RoundPlan, delta: Weights,
                      correction: Weights, examples: int) -> tuple[Weights, Weights]:
        """Option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; (c_i+, c_i+ - c_i).

        ``K`` is the steps' effective number: with momentum, ``K`` steps move further
        than ``K`` plain ones (:func:`fl_tasks.base.momentum_steps`), and dividing by the
        plain count would inflate ``c_i`` by up to ``1 / (1 - momentum)``.
        """
        hp = plan.hyperparams
        steps = momentum_steps(hp.local_epochs * math.ceil(examples / hp.batch_size),
                               hp.momentum)
        own = state.control or {}
        new: Weights = {}
        change: Weights = {}
        for name, value in delta.items():
            c_i = own.get(name, np.zeros(value.shape, np.float32)).astype(np.float64)
            c = correction[name].astype(np.float64) + c_i
            updated = c_i - c - value.astype(np.float64) / (steps * hp.learning_rate)
            new[name] = updated.astype(np.float32)
            change[name] = (updated - c_i).astype(np.float32)
        return new, change

    def _load_control(self, task: str) -> Weights:
        path = self._control_path(task)
        if path is None or not path.exists():
            return {}
        try:
            return {k: np.asarray(v, np.float32)
                    for k, v in safetensors.numpy.load(path.read_bytes()).items()}
        except (OSError, ValueError, safetensors.SafetensorError) as exc:
            self.counters.add("fl_control_unreadable")
            logger.warning("%s: SCAFFOLD control variate of %s unreadable, starting from "
                           "zero: %s", self.device_id, task, exc)
            return {}

    def _save_control(self, task: str, state: TaskState, control: Weights) -> None:
        state.control = control
        path = self._control_path(task)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(safetensors.numpy.save(control))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def _job(plan: RoundPlan, device_id: str) -> tuple[int, int]:
    """What one training answers: (round, attempt), or (ticket, -1) in async mode."""
    if plan.mode == "async":
        return plan.tickets.get(device_id, 0), -1
    return plan.round, plan.attempt


def _initial(task: FLTask) -> Weights:
    from fl_tasks.base import get_weights

    return get_weights(task.build_model())


def privatize(delta: Weights, spec: PrivacySpec, rng: np.random.Generator | None = None,
              ) -> tuple[Weights, float | None]:
    """Clip the whole update to ``spec.clip_norm`` (L2), add the round's noise.

    Returns the update to send and, with adaptive clipping, the noised clip bit.
    ``rng`` (tests only) replaces the generator seeded by the operating system.
    """
    rng = rng or np.random.default_rng(secrets.randbits(128))
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    scale = min(1.0, spec.clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for name, value in delta.items():
        clipped = value.astype(np.float64) * scale
        if spec.noise_stddev > 0:
            clipped += rng.normal(0.0, spec.noise_stddev, value.shape)
        out[name] = clipped.astype(np.float32)
    bit = None
    if spec.clip_count_stddev is not None:
        bit = float(norm <= spec.clip_norm)
        if spec.clip_count_stddev > 0:
            bit += float(rng.normal(0.0, spec.clip_count_stddev))
    return out, bit
