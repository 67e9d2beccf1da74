"""Issue 14: the broker restarts in the middle of a staged rollout.

A canary installs 1.0.0; while it is on probation the broker goes away, past the end
of the probation, and comes back (persistence on, as `edgefl broker` runs it). The
rollout manager widens to the rest of the fleet once it can, the rollout completes,
every device runs 1.0.0, the cloud knows each one's state from its statuses, and no
telemetry reading of any device is lost or stored twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloud.models.formats import ArtifactFormat
from cloud.models.rollout import RolloutSpec
from cloud.models.rollout_store import RolloutStore
from cloud.releases import save_signing_key
from cloud.service import ServiceThread
from edge_node.agent import EdgeAgent
from schemas.topics import Topics
from tests.agent_fixtures import agent_settings, wait_until
from tests.conftest import RunningBroker
from tests.releases import KEY_ID, SIGNING_KEY, export_onnx, mlp
from tests.test_cloud_faults import cloud_settings

pytestmark = pytest.mark.integration
MODEL = "digits"
PROBATION_S = 3.0


def test_a_broker_restart_during_a_rollout_lets_it_finish_with_nothing_lost(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    broker = restartable_mosquitto
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    data = tmp_path / "cloud"
    save_signing_key(SIGNING_KEY, data / "keys" / "release.pem")
    service = ServiceThread(cloud_settings(broker, topics, data, rules,
                                           models={"key_id": KEY_ID, "chunk_bytes": 4096}))
    service.start()
    agents = [EdgeAgent(agent_settings(broker, topics, d, tmp_path / d, interval_s=0.3))
              for d in ("dev-a", "dev-b")]
    try:
        for agent in agents:
            agent.start()
        registry = service.service.registry
        wait_until(lambda: all((r := registry.get(a.device_id)) is not None and r.online
                               for a in agents), timeout=20, what="devices known")
        service.service.models.register(MODEL, "1.0.0", export_onnx(mlp(1), tmp_path / "m.onnx"),
                                        ArtifactFormat.ONNX, input_shape=[-1, 64])
        requests = RolloutStore(service.service.store)
        spec = RolloutSpec(model=MODEL, version="1.0.0", canary_devices=["dev-a"],
                           steps=[100.0], probation_s=PROBATION_S, abort_alert_severity=None)
        request_id = requests.request("release", spec.model_dump(mode="json"))
        wait_until(lambda: (r := requests.get_request(request_id)) is not None
                   and r.state != "pending", what="the release taken")

        def active(agent: EdgeAgent) -> str | None:
            installed = agent.store.active(MODEL)
            return installed.version if installed else None

        wait_until(lambda: active(agents[0]) == "1.0.0", timeout=30, what="the canary installed")
        assert active(agents[1]) is None
        status = service.service.rollouts.status(MODEL)
        assert status is not None and status["stage"] == 0
        broker.process.stop()
        away_until = time.monotonic() + PROBATION_S + 1.0  # the probation ends meanwhile
        wait_until(lambda: time.monotonic() > away_until, timeout=PROBATION_S + 5,
                   what="the probation over while the broker is away")
        broker.process.start()

        def completed() -> bool:
            now_status = service.service.rollouts.status(MODEL)
            return now_status is not None and now_status["state"] == "completed"

        wait_until(completed, timeout=60, what="the rollout completed after the restart")
        wait_until(lambda: all(active(a) == "1.0.0" for a in agents), timeout=30,
                   what="every device on 1.0.0")
        final = service.service.rollouts.status(MODEL)
        assert final is not None
        assert set(final["devices"]) == {"dev-a", "dev-b"}, final
        assert all(s["state"] in ("active", "installed") for s in final["devices"].values()), \
            final
        # No telemetry lost or doubled across the restart: every seq once, per session.
        last = {a.device_id: a.telemetry_seq - 1 for a in agents}

        def stored(agent: EdgeAgent) -> list[int]:
            return [r["seq"] for r in service.service.store.query(
                "SELECT seq FROM telemetry WHERE device_id=? AND session_id=? ORDER BY seq",
                (agent.device_id, agent.session_id))]

        wait_until(lambda: all(stored(a)[-1:] >= [last[a.device_id]] for a in agents),
                   timeout=30, what="telemetry stored up to the last reading")
        for agent in agents:
            seqs = stored(agent)
            assert seqs == list(range(len(seqs))), agent.device_id
    finally:
        for agent in agents:
            agent.stop()
        service.stop()
