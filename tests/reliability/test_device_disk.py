"""A device whose disk refuses every write (full, or its state folder unwritable): it says
so in its telemetry, keeps publishing it, and keeps serving its model; when the disk
takes writes again its outbox works as before. Real broker, real onnxruntime.

The refusal is the kernel's: the file-size limit (RLIMIT_FSIZE) is set to one byte for
this process, so every write past the start of a file fails with EFBIG, as ENOSPC would
on a full card. The broker runs in its own process and is not limited.
"""

from __future__ import annotations

import resource
import signal
import time

import numpy as np
import pytest
import torch

from schemas.base import decode_message
from schemas.device import DeviceTelemetry
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.mqtt_client import SyncClient
from tests.releases import reference
from tests.test_edge_ota import BATCH, MODEL, install, onnx_v1

pytestmark = pytest.mark.integration
__all__ = ["onnx_v1"]  # the fixture, used by name
REFUSING_S = 3.0


def test_a_device_whose_disk_refuses_writes_reports_it_and_keeps_serving(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent(interval_s=0.2)
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    expected = reference(onnx_v1[0], BATCH)

    def readings() -> list[DeviceTelemetry]:
        return [decode_message(DeviceTelemetry, m.payload)
                for m in cloud.received_on(topics.telemetry(agent.device_id))]

    first_refused = agent.telemetry_seq
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, previous_limit[1]))
    try:
        served = 0
        deadline = time.monotonic() + REFUSING_S
        while time.monotonic() < deadline:
            np.testing.assert_allclose(agent.infer(MODEL, BATCH), expected,
                                       rtol=1e-5, atol=1e-5)
            served += 1
            time.sleep(0.05)
        last_refused = agent.telemetry_seq - 1
        wait_until(lambda: any(r.counters.get("buffer_disk_error", 0) >= 1
                               for r in readings()), timeout=10,
                   what="telemetry saying the outbox cannot write")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert last_refused - first_refused >= REFUSING_S / 0.2 - 3  # it kept measuring
    assert served > 20
    # Every reading taken while the disk refused arrived (sent past the outbox), once.
    wait_until(lambda: {r.seq for r in readings()} >= set(range(first_refused,
                                                                 last_refused + 1)),
               timeout=15, what="every reading of the refusing window delivered")
    seqs = [r.seq for r in readings() if r.session_id == agent.session_id]
    assert len(seqs) == len(set(seqs)), "a reading delivered twice"
    # The disk takes writes again: the outbox is used again, the counter stops growing.
    errors = agent.counters["buffer_disk_error"]
    assert errors >= last_refused - first_refused
    resumed = agent.telemetry_seq
    wait_until(lambda: agent.telemetry_seq >= resumed + 5, timeout=10, what="five more readings")
    assert agent.counters["buffer_disk_error"] == errors
    assert agent._thread is not None and agent._thread.is_alive()
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), expected, rtol=1e-5, atol=1e-5)
