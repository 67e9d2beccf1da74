"""What secure aggregation costs: round wall time and bytes per device, with and without it.

The real system: a local Mosquitto, the cloud service, and N edge agents in this process
(identities from provisioning), digits with a ~100k-parameter MLP, FedAvg, every device
in every round. The same rounds run twice per fleet size, without and with ``secagg``;
the ratios (with / without) come from the same run. Prints JSON:

    .venv/bin/python bench/bench_secagg.py [--devices 10,50] [--rounds 4]

Bytes per device: what a device sent (its update, or its four secure-aggregation
messages) and what it received for the protocol (the roster, its inbox, the survivors;
the global weights and the round plan are the same with and without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.local import LocalBroker, start_local_broker  # noqa: E402
from cloud.service import ServiceThread  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from edge_node.agent import EdgeAgent  # noqa: E402
from edge_node.settings import EdgeSettings  # noqa: E402

HIDDEN = 1333
"""64 inputs, 1,333 hidden units, 10 classes: 99,985 parameters."""
HP = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.1}
ROOT = "edgefl/v1"


class Spy:
    """Counts the bytes the cloud publishes for the protocol (it reads every inbox)."""

    def __init__(self, broker: LocalBroker, task: str) -> None:
        creds = broker.credentials("edgefl-cloud")
        assert creds is not None
        self.inboxes = 0
        self.broadcasts = 0
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

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(broker: LocalBroker, folder: Path, ids: list[str], *, rounds: int,
        secure: bool) -> dict[str, Any]:
    """One task; the median round time (first round left out) and bytes per device."""
    name = f"sa-{uuid.uuid4().hex[:6]}"
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    task = {"task": "fl_tasks.digits:DigitsTask", "task_kwargs": {"hidden": HIDDEN},
            "rounds": rounds, "strategy": "fedavg", "fraction_fit": 1.0,
            "min_fit_clients": len(ids), "min_available_clients": len(ids),
            "round_timeout_s": 300, "hyperparams": HP}
    if secure:
        task["secagg"] = {"threshold": 0.67, "clip_range": 0.5, "stage_timeout_s": 120}
    cloud = ServiceThread(CloudSettings.model_validate({
        "instance": f"bench-{uuid.uuid4().hex[:6]}", "topic_root": ROOT,
        "data_dir": folder / name, "fl": {name: task},
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
    })).start()
    spy = Spy(broker, name) if secure else None
    secrets = broker.settings.layout.secrets
    agents = []
    for i, device_id in enumerate(ids):
        fl: dict[str, Any] = {"tasks": {name: {
            "path": "fl_tasks.digits:DigitsTask", "options": {"hidden": HIDDEN},
            "partition": i, "partitions": len(ids), "scheme": "iid"}}}
        if secure:
            fl["secagg"] = {"identity_key": secrets / "identities" / f"{device_id}.key",
                            "certificate": secrets / "identities" / f"{device_id}.json",
                            "authority_key": (secrets / "identity-authority.pub")
                            .read_text().strip()}
        agent = EdgeAgent(EdgeSettings.model_validate({
            "device_id": device_id, "topic_root": ROOT, "state_dir": folder / name / device_id,
            "mqtt": {"host": broker.host, "port": broker.port,
                     "password": broker.credentials(device_id)[1]},  # type: ignore[index]
            "telemetry": {"interval_s": 5.0}, "fl": fl}))
        agent.start()
        agents.append(agent)
    coordinator = cloud.service.coordinators[name]
    started = time.monotonic()
    pause = threading.Event()
    while coordinator.state.state.value not in ("finished", "failed"):
        if time.monotonic() - started > rounds * 300:
            raise TimeoutError("the task did not finish")
        pause.wait(0.1)
    history = coordinator.history()
    for agent in agents:
        agent.stop()
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
    if spy is not None:
        spy.close()
        per_round_device = (spy.inboxes + spy.broadcasts * len(ids)) / (rounds * len(ids))
        out["protocol_bytes_received_per_device"] = round(per_round_device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,50")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        folder = Path(tmp)
        ids = [f"sa-{i:03d}" for i in range(max(sizes))]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        try:
            for size in sizes:
                plain = run(broker, folder, ids[:size], rounds=args.rounds, secure=False)
                secure = run(broker, folder, ids[:size], rounds=args.rounds, secure=True)
                results[str(size)] = {
                    "plain": plain, "secagg": secure,
                    "round_time_ratio": round(secure["round_s_median"]
                                              / plain["round_s_median"], 2),
                    "sent_bytes_ratio": round(secure["sent_bytes_per_device"]
                                              / plain["sent_bytes_per_device"], 3)}
                print(f"{size} devices: {results[str(size)]['round_time_ratio']}x round time",
                      file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(json.dumps({"benchmark": "secagg", "parameters": 75 * HIDDEN + 10,
                      "rounds": args.rounds, "by_devices": results}, indent=1))


if __name__ == "__main__":
    main()
