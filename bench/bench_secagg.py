"""What secure aggregation costs: round wall time and bytes per device, with and without it.

The real system: a local Mosquitto, the cloud service in this process, and N edge agents
in ``edgefl fleet`` processes (two, one per core here; identities from provisioning),
digits with a ~100k-parameter MLP, FedAvg, every device in every round. The same rounds
run three times per fleet size on the same running fleet: without ``secagg``, with it
over the complete graph (Bonawitz et al.), and with SecAgg+ (``neighbours: auto``, Bell
et al.); the ratios (with / without) come from the same run. Prints JSON:

    .venv/bin/python bench/bench_secagg.py [--devices 10,50] [--rounds 8] [--in-process]

``--in-process`` runs the agents in this process next to the cloud instead, as the first
version of this benchmark did: one interpreter lock for 50 devices' training and
cryptography and the cloud's event loop. Both rounds are slower that way (50 devices:
0.53 s plain, 2.0 s secure, 3.7-3.8x; with the fleet in its own processes 0.25 s and
1.2 s, 4.9x): the plain round gains the most, since its only extra work is training.

The devices share this machine's two cores, so the protocol's per-device work (verify 50
signed key advertisements, 49 key agreements and encrypted share pairs, 49 pairwise masks
of the model's size: about 15 ms per device at 50) adds up over the fleet, while on a
real fleet each device spends it on its own processor.

Bytes per device: what a device sent (its update, or its four secure-aggregation
messages) and what it received for the protocol (the roster, its inbox, the survivors;
the global weights and the round plan are the same with and without it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_rollout import cpu_seconds  # noqa: E402

from broker.local import LocalBroker, start_local_broker  # noqa: E402
from cloud.service import ServiceThread  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from edge_node.agent import EdgeAgent  # noqa: E402
from edge_node.settings import EdgeSettings  # noqa: E402

HIDDEN = 1333
"""64 inputs, 1,333 hidden units, 10 classes: 99,985 parameters."""
HP = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.1}
TASK = "fl_tasks.digits:DigitsTask"
ROOT = "edgefl/v1"


class Spy:
    """Counts the bytes the cloud publishes for the protocol (it reads every inbox)."""

    def __init__(self, broker: LocalBroker, task: str) -> None:
        creds = broker.credentials("edgefl-cloud")
        assert creds is not None
        self.inboxes = 0
        self.broadcasts = 0
        self.neighbours: int | None = None
        """The rosters' graph degree (None: the complete graph)."""
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spy-{task}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(*creds)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(
            f"{ROOT}/fl/{task}/rounds/+/secagg/#", qos=1)
        self.client.connect(broker.host, broker.service_port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("spy not subscribed")

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        levels = message.topic.split("/")
        stage = levels[levels.index("secagg") + 1:]
        with self.lock:
            if len(stage) == 3 and stage[1] == "to":  # shares/to/{d}
                self.inboxes += len(message.payload)
            elif len(stage) == 1:  # roster, survivors
                self.broadcasts += len(message.payload)
                if stage[0] == "roster":
                    self.neighbours = json.loads(message.payload).get("neighbours")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


SECURE = {"clip_range": 0.5, "stage_timeout_s": 120}
VARIANTS: dict[str, Any] = {
    "plain": None,
    "secagg": SECURE | {"threshold": 0.67},
    "secagg_plus": SECURE | {"threshold": 0.67, "neighbours": "auto"},
    "secagg_plus_t90": SECURE | {"threshold": 0.9, "neighbours": "auto"},
}
"""The same rounds without secure aggregation, with it over the complete graph (Bonawitz
et al.), and with SecAgg+ (Bell et al., ``neighbours: auto``) at two thresholds: at 0.67
up to 16 of 50 may drop out and k = 32; at 0.9, 5 of 50 and k = 10 (6 and 2 at 10
devices)."""
PLUS = ("secagg_plus", "secagg_plus_t90")


def task_settings(name: str, ids: list[str], rounds: int, variant: str) -> dict[str, Any]:
    """The cloud's task: every device in every round, with the variant's ``secagg``."""
    task: dict[str, Any] = {
        "task": TASK, "task_kwargs": {"hidden": HIDDEN}, "rounds": rounds,
        "strategy": "fedavg", "fraction_fit": 1.0, "min_fit_clients": len(ids),
        "min_available_clients": len(ids), "round_timeout_s": 300, "hyperparams": HP}
    if VARIANTS[variant] is not None:
        task["secagg"] = VARIANTS[variant]
    return task


def device_task(name: str, partition: int, partitions: int) -> dict[str, Any]:
    """A device's membership of a task: its IID partition of digits."""
    return {name: {"path": TASK, "options": {"hidden": HIDDEN}, "partition": partition,
                   "partitions": partitions, "scheme": "iid"}}


def start_agents(broker: LocalBroker, folder: Path, ids: list[str],
                 names: list[str]) -> list[EdgeAgent]:
    """``--in-process``: the agents in this process (members of the tasks ``names``)."""
    secrets = broker.settings.layout.secrets
    agents = []
    for i, device_id in enumerate(ids):
        fl: dict[str, Any] = {"tasks": {k: v for name in names
                                        for k, v in device_task(name, i, len(ids)).items()},
                              "secagg": {
                                  "identity_key": secrets / "identities" / f"{device_id}.key",
                                  "certificate": secrets / "identities" / f"{device_id}.json",
                                  "authority_key": (secrets / "identity-authority.pub")
                                  .read_text().strip()}}
        agent = EdgeAgent(EdgeSettings.model_validate({
            "device_id": device_id, "topic_root": ROOT, "state_dir": folder / device_id,
            "mqtt": {"host": broker.host, "port": broker.port,
                     "password": broker.credentials(device_id)[1]},  # type: ignore[index]
            "telemetry": {"interval_s": 5.0}, "fl": fl}))
        agent.start()
        agents.append(agent)
    return agents


def start_fleet(broker: LocalBroker, folder: Path, ids: list[str], prefix: str,
                names: list[str]) -> subprocess.Popen[bytes]:
    """The agents in ``edgefl fleet``, two processes (device i: partition i, IID)."""
    config = folder / f"edge-{prefix.rstrip('-')}.yaml"
    config.write_text(yaml.safe_dump({"fl": {"tasks": {
        name: {"path": TASK, "options": {"hidden": HIDDEN}, "scheme": "iid"}
        for name in names}}}))
    with (folder / f"fleet-{prefix.rstrip('-')}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "edgefl", "fleet", "--devices", str(len(ids)),
             "--per-process", str(-(-len(ids) // 2)), "--prefix", prefix,
             "--broker", f"{broker.host}:{broker.port}", "--topic-root", ROOT,
             "--secrets-dir", str(broker.settings.layout.secrets), "--interval", "5",
             "--state-dir", str(folder / f"fleet-{prefix}"), "--config", str(config),
             *[x for name in names for x in ("--fl-task", f"{name}={TASK}")]],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_fleet(fleet: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the fleet's process group; SIGKILL if it has not ended in 60 s."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(fleet.pid, signum)
        except ProcessLookupError:
            return
        try:
            fleet.wait(60)
        except subprocess.TimeoutExpired:
            continue
        return


def processor_seconds(fleet: subprocess.Popen[bytes] | None) -> float:
    """User and system time of the fleet's processes so far (0 without a fleet)."""
    return cpu_seconds(fleet.pid) if fleet is not None else 0.0


def run(broker: LocalBroker, folder: Path, name: str, ids: list[str], *, rounds: int,
        variant: str, fleet: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """One task on the running agents; the median round time (first round left out)."""
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    secure = VARIANTS[variant] is not None
    cloud = ServiceThread(CloudSettings.model_validate({
        "instance": f"bench-{uuid.uuid4().hex[:6]}", "topic_root": ROOT,
        "data_dir": folder / name, "fl": {name: task_settings(name, ids, rounds, variant)},
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
    })).start()
    spy = Spy(broker, name) if secure else None
    coordinator = cloud.service.coordinators[name]
    started = time.monotonic()
    mark: tuple[float, float, int] | None = None  # a round >= 2 seen open: clock, CPU, round
    pause = threading.Event()
    while coordinator.state.state.value not in ("finished", "failed"):
        current = coordinator.state.current
        if mark is None and current is not None and current.round >= 2:
            mark = (time.monotonic(), processor_seconds(fleet), current.round)
        if time.monotonic() - started > rounds * 300:
            raise TimeoutError("the task did not finish")
        if fleet is not None and fleet.poll() is not None:
            raise RuntimeError(f"the fleet exited with {fleet.returncode}; its log is in "
                               f"{folder}")
        pause.wait(0.1)
    history = coordinator.history()
    end = (time.monotonic(), processor_seconds(fleet))
    cloud.stop()
    if coordinator.state.state.value != "finished":
        raise RuntimeError(f"the task failed: {coordinator.state.message}")
    measured = history[1:] or history
    received = statistics.median(h.bytes_received / max(1, len(h.participants))
                                 for h in measured)
    out = {"round_s_median": round(statistics.median(h.duration_s or 0.0 for h in measured),
                                   3),
           "rounds_measured": len(measured),
           "sent_bytes_per_device": round(received),
           "participants_median": statistics.median(len(h.participants) for h in measured),
           "final_central_accuracy": history[-1].central_accuracy}
    if fleet is not None and mark is not None:
        # the devices' processor time over the measured rounds, against the cores'
        cpu, elapsed = end[1] - mark[1], end[0] - mark[0]
        out["fleet_cpu_s_per_round"] = round(cpu / (len(history) - mark[2] + 1), 3)
        out["fleet_cpu_utilisation"] = round(cpu / (elapsed * (os.cpu_count() or 1)), 2)
    if spy is not None:
        spy.close()
        per_round_device = (spy.inboxes + spy.broadcasts * len(ids)) / (rounds * len(ids))
        out["protocol_bytes_received_per_device"] = round(per_round_device)
        out["neighbours"] = spy.neighbours if spy.neighbours is not None else len(ids) - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,50")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--in-process", action="store_true",
                        help="The agents in this process, next to the cloud")
    args = parser.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        folder = Path(tmp)
        fleets = {size: [f"s{size}-{i:03d}" for i in range(size)] for size in sizes}
        broker = start_local_broker(folder / "broker", kind="mosquitto",
                                    device_ids=[d for ids in fleets.values() for d in ids])
        try:
            for size, ids in fleets.items():
                names = {variant: f"{variant.replace('_', '')}{size}" for variant in VARIANTS}
                agents, fleet = [], None
                runs: dict[str, dict[str, Any]] = {}
                try:
                    if args.in_process:
                        agents = start_agents(broker, folder, ids, list(names.values()))
                    else:
                        fleet = start_fleet(broker, folder, ids, f"s{size}-",
                                            list(names.values()))
                    for variant, name in names.items():
                        runs[variant] = run(broker, folder, name, ids, rounds=args.rounds,
                                            variant=variant, fleet=fleet)
                finally:
                    for agent in agents:
                        agent.stop()
                    if fleet is not None:
                        stop_fleet(fleet)
                plain, secure = runs["plain"], runs["secagg"]
                results[str(size)] = {
                    **runs,
                    "round_time_ratio": round(secure["round_s_median"]
                                              / plain["round_s_median"], 2),
                    "sent_bytes_ratio": round(secure["sent_bytes_per_device"]
                                              / plain["sent_bytes_per_device"], 3),
                    "plus": {variant: {
                        "threshold": VARIANTS[variant]["threshold"],
                        "neighbours": runs[variant]["neighbours"],
                        "round_time_ratio": round(runs[variant]["round_s_median"]
                                                  / plain["round_s_median"], 2),
                        "sent_bytes_ratio": round(runs[variant]["sent_bytes_per_device"]
                                                  / plain["sent_bytes_per_device"], 3)}
                        for variant in PLUS}}
                print(f"{size} devices: {results[str(size)]['round_time_ratio']}x round time; "
                      "SecAgg+ " + ", ".join(
                          f"{v['threshold']}: {v['round_time_ratio']}x"
                          for v in results[str(size)]["plus"].values()),
                      file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(json.dumps({"benchmark": "secagg", "parameters": 75 * HIDDEN + 10,
                      "rounds": args.rounds,
                      "devices_in": "this process" if args.in_process
                      else "two edgefl fleet processes",
                      "by_devices": results}, indent=1))


if __name__ == "__main__":
    main()
