"""A simulated fleet: many real agents in one process.

Each agent has its own MQTT connection, credentials and state folder. Telemetry
values come from the host's psutil (read once per second for the whole fleet)
with a per-device jitter; the message path is the real one. Each simulated device
trains on one thread (torch's intra-op pool is process-wide: with one pool per core
for every agent, concurrent trainings oversubscribe the cores, measured 2.9x slower
for five MNIST-1D trainings at once on two cores).
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_node.agent import EdgeAgent
from edge_node.errors import EdgeError
from edge_node.heterogeneity import DeviceProfile
from edge_node.settings import (
    EdgeSettings,
    FLTaskSettings,
    MqttSettings,
    SecAggSettings,
    SimulatedDevice,
)
from edge_node.system_metrics import SystemSample, sample
from schemas.client_settings import TlsClientSettings

logger = logging.getLogger(__name__)


class SharedSampler:
    """One psutil reading per ``max_age_s`` for the whole fleet."""

    def __init__(self, data_path: Path, max_age_s: float = 1.0) -> None:
        self.data_path = data_path
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._sample: SystemSample | None = None
        self._at = 0.0

    def __call__(self) -> SystemSample:
        """The cached reading, refreshed when older than ``max_age_s``."""
        with self._lock:
            if self._sample is None or time.monotonic() - self._at > self.max_age_s:
                self._sample = sample(self.data_path)
                self._at = time.monotonic()
            return self._sample


class JitteredSampler:
    """The shared reading, shifted per device so devices differ (deterministic per id)."""

    def __init__(self, shared: SharedSampler, device_id: str, spread: float = 10.0) -> None:
        self.shared = shared
        self.rng = random.Random(device_id)  # noqa: S311 - simulation noise, not crypto
        self.offset = self.rng.uniform(-spread, spread)
        self.spread = spread

    def _jitter(self, value: float) -> float:
        noise = self.rng.uniform(-self.spread / 4, self.spread / 4)
        return min(100.0, max(0.0, value + self.offset + noise))

    def __call__(self) -> SystemSample:
        """This device's jittered reading."""
        s = self.shared()
        return replace(s, cpu_percent=self._jitter(s.cpu_percent),
                       memory_percent=self._jitter(s.memory_percent))


def fleet_settings(
    count: int, *, prefix: str, state_root: Path, mqtt: MqttSettings,
    secrets_dir: Path | None = None, interval_s: float | None = None,
    topic_root: str | None = None,
    first_index: int = 0, base: EdgeSettings | None = None,
    fl_tasks: dict[str, str] | None = None, partitions: int | None = None,
    tls_dir: Path | None = None, profiles: dict[str, DeviceProfile] | None = None,
) -> list[EdgeSettings]:
    """Settings for ``count`` devices named ``{prefix}{i:03d}``.

    Each device's password is read from ``secrets_dir/{id}.password`` (the files
    ``edgefl broker add-device`` writes) when a folder is given; with ``tls_dir`` (the
    broker's ``pki`` folder: ``ca.crt``, ``clients/{id}.crt`` and ``.key``, from
    ``edgefl broker add-device --tls``) each device connects with its certificate
    instead, its identity the certificate's CN. ``base`` (a settings
    file) gives everything else, the telemetry interval too unless ``interval_s``
    overrides it; ``fl_tasks`` (name -> import path) makes every
    device a member of those tasks, device ``i`` holding partition ``i`` of
    ``partitions`` (the fleet's size by default). The outbox is not fsynced on
    every write (it survives a crash of the process, not of the machine). When
    ``secrets_dir`` also holds the identities ``add-device`` issued
    (``identities/{id}.key`` and ``.json``, and ``identity-authority.pub``), each
    device takes part in tasks that aggregate securely with its own.
    """
    result = []
    template = base or EdgeSettings(device_id="fleet-template")
    total = partitions or (first_index + count)
    authority = secrets_dir / "identity-authority.pub" if secrets_dir else None
    authority_key = authority.read_text().strip() \
        if authority is not None and authority.is_file() else None
    for i in range(first_index, first_index + count):
        device_id = f"{prefix}{i:03d}"
        password_file = secrets_dir / f"{device_id}.password" if secrets_dir else None
        device_mqtt = mqtt.model_copy(update={"password_file": password_file, "username": None,
                                              "password": None})
        if tls_dir is not None:
            device_mqtt = device_mqtt.model_copy(update={
                "password_file": None, "tls": TlsClientSettings(
                    ca_file=tls_dir / "ca.crt",
                    cert_file=tls_dir / "clients" / f"{device_id}.crt",
                    key_file=tls_dir / "clients" / f"{device_id}.key")})
        tasks = dict(template.fl.tasks)
        for name, path in (fl_tasks or {}).items():
            # A task the settings file also names keeps its options (model size, split).
            known = tasks.get(name)
            tasks[name] = FLTaskSettings(path=path, partition=i % total, partitions=total) \
                if known is None else known.model_copy(update={
                    "path": path, "partition": i % total, "partitions": total})
        fl_update: dict[str, object] = {"tasks": tasks}
        identities = secrets_dir / "identities" if secrets_dir else None
        if authority_key is not None and identities is not None \
                and (identities / f"{device_id}.key").is_file():
            fl_update["secagg"] = SecAggSettings(
                identity_key=identities / f"{device_id}.key",
                certificate=identities / f"{device_id}.json", authority_key=authority_key)
        update: dict[str, object] = {
            "device_id": device_id, "state_dir": state_root / device_id, "mqtt": device_mqtt,
            "telemetry": template.telemetry if interval_s is None
            else template.telemetry.model_copy(update={"interval_s": interval_s}),
            "buffer": template.buffer.model_copy(update={"durable": False}),
        }
        profile = (profiles or {}).get(device_id)
        if profile is not None:
            fl_update["simulation"] = SimulatedDevice(
                speed_factor=profile.speed_factor, failure_rate=profile.failure_rate,
                seed=profile.seed)
        update["fl"] = template.fl.model_copy(update=fl_update)
        if topic_root:
            update["topic_root"] = topic_root
        result.append(EdgeSettings.model_validate(
            {**template.model_dump(), **update}))
    return result


def missing_passwords(count: int, *, prefix: str, first_index: int, secrets_dir: Path,
                      ) -> list[str]:
    """Device ids of the fleet without a password file in ``secrets_dir``."""
    ids = (f"{prefix}{i:03d}" for i in range(first_index, first_index + count))
    return [d for d in ids if not (secrets_dir / f"{d}.password").is_file()]


MAX_AGENTS_PER_PROCESS = 100
"""paho waits on its sockets with select(), which cannot watch descriptors above 1023;
each agent holds 6 (its connection, paho's wake-up socket pair, and its outbox's
database, WAL and shared-memory files). Larger fleets run in several processes."""


@dataclass(frozen=True)
class Traffic:
    """Requests the simulated applications send to a model, with their true labels."""

    model: str
    x: np.ndarray
    y: np.ndarray
    rate_per_s: float
    """Requests per second per device."""


class TrafficLoop:
    """One thread that serves requests on every agent whose ``model`` is active.

    Each request is one example of the task's test split (device i starts at a
    different place), answered by the agent's active model; whether the answer is
    the label goes back as labelled feedback, so the devices' ``ModelMetrics`` carry
    latency, errors and accuracy. A failed inference is what the agent counts as an
    error; the loop goes on.
    """

    def __init__(self, agents: list[EdgeAgent], traffic: Traffic) -> None:
        self.agents = agents
        self.traffic = traffic
        self.served = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-traffic", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (bounded)."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        t = self.traffic
        count = len(t.y)
        position = {a.device_id: (i * 7919) % count for i, a in enumerate(self.agents)}
        period = 1.0 / t.rate_per_s
        while not self._stop.wait(period):
            for agent in self.agents:
                if agent.store.active(t.model) is None:
                    continue
                i = position[agent.device_id]
                position[agent.device_id] = (i + 1) % count
                try:
                    logits = agent.infer(t.model, t.x[i:i + 1])
                except EdgeError as exc:  # counted by the agent's inference service
                    self.failed += 1
                    logger.debug("%s: request failed: %s", agent.device_id, exc)
                    continue
                agent.inference.record_feedback(t.model, int(logits.argmax() == t.y[i]), 1)
                self.served += 1


class Fleet:
    """Start and stop many agents together (at most MAX_AGENTS_PER_PROCESS).

    With ``profiles`` whose devices have offline periods, a scheduler thread stops a
    device's agent when one begins and starts a new agent on its settings (its state
    folder) when it ends.
    """

    def __init__(self, settings: list[EdgeSettings], data_path: Path,
                 traffic: Traffic | None = None,
                 profiles: dict[str, DeviceProfile] | None = None) -> None:
        self.shared = SharedSampler(data_path)
        self.settings = settings
        self.agents = [self._agent(s) for s in settings]
        if len(self.agents) > 1 and "torch" in sys.modules:  # loaded by FL tasks
            one_thread_per_device()
        self.traffic = TrafficLoop(self.agents, traffic) if traffic is not None else None
        self.profiles = {d: p for d, p in (profiles or {}).items() if p.offline}
        self.power_cycles = 0
        self.running: dict[str, bool] = {}
        """Whether each device's agent runs now (the scheduler's to change)."""
        self._halt = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._started = 0.0

    def _agent(self, settings: EdgeSettings) -> EdgeAgent:
        return EdgeAgent(settings, sampler=JitteredSampler(self.shared, settings.device_id))

    def start(self) -> None:
        """Start every agent (each connects in the background)."""
        self._started = time.monotonic()
        for agent in self.agents:
            self.running[agent.device_id] = self._online(agent.device_id, 0.0)
            if self.running[agent.device_id]:
                agent.start()
        if self.traffic is not None:
            self.traffic.start()
        if self.profiles:
            self._scheduler = threading.Thread(target=self._schedule, name="fleet-schedule",
                                               daemon=True)
            self._scheduler.start()

    def _online(self, device_id: str, t: float) -> bool:
        profile = self.profiles.get(device_id)
        return profile is None or profile.online_at(t)

    def _schedule(self) -> None:
        """Power devices off and on along their availability schedules."""
        running = self.running
        while not self._halt.wait(0.2):
            t = time.monotonic() - self._started
            for index, settings in enumerate(self.settings):
                device_id = settings.device_id
                wanted = self._online(device_id, t)
                if wanted == running[device_id] or self._halt.is_set():
                    continue
                if wanted:
                    agent = self._agent(settings)
                    self.agents[index] = agent
                    agent.start()
                    self.power_cycles += 1
                else:
                    self.agents[index].stop()
                logger.info("%s: %s (availability schedule, t=%.1f s)", device_id,
                            "back online" if wanted else "offline", t)
                running[device_id] = wanted

    def wait_connected(self, timeout: float) -> int:
        """Wait (bounded) until every agent is connected; returns how many are."""
        deadline = time.monotonic() + timeout
        online = [a for a in self.agents if self.running.get(a.device_id, True)]
        for agent in online:
            agent.session.connected.wait(max(0.0, deadline - time.monotonic()))
        return sum(a.session.connected.is_set() for a in online)

    def stop(self) -> None:
        """Stop every agent cleanly (offline state, disconnect)."""
        self._halt.set()
        if self._scheduler is not None:
            self._scheduler.join(60)
        if self.traffic is not None:
            self.traffic.stop()
        for agent in self.agents:
            if self.running.get(agent.device_id, True):
                agent.stop()


def one_thread_per_device() -> None:
    """Give torch one intra-op thread: the process hosts many devices that train at once."""
    import torch  # only processes that train load it

    torch.set_num_threads(1)
