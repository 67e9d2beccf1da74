"""Run real cloud services (aiomqtt, SQLite, rules) against the Mosquitto fixture."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.service import ServiceThread
from cloud.settings import CloudSettings
from schemas.topics import Topics
from tests.conftest import RunningBroker

TEST_RULES = """
rules:
  - name: cpu_high
    kind: threshold
    source: telemetry
    field: cpu_percent
    op: ">"
    threshold: 90
    clear_threshold: 80
    for_samples: 2
    severity: major
  - name: device_silent
    kind: absence
    intervals: 3
    severity: critical
"""


class RunningCloud(ServiceThread):
    """A started cloud service with helpers for assertions."""

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Query the service's SQLite store."""
        return [dict(r) for r in self.service.store.query(sql, params)]


CloudFactory = Callable[..., RunningCloud]


@pytest.fixture
def make_cloud(mosquitto: RunningBroker, topics: Topics,
               tmp_path: Path) -> Iterator[CloudFactory]:
    """Builds started cloud services for the test's topic root; stops them afterwards."""
    clouds: list[RunningCloud] = []
    rules = tmp_path / "rules.yaml"
    rules.write_text(TEST_RULES)

    def factory(*, instance: str | None = None, data_dir: Path | None = None,
                start: bool = True, **overrides: Any) -> RunningCloud:
        instance = instance or f"c{uuid.uuid4().hex[:8]}"
        mqtt = {"host": mosquitto.host, "port": mosquitto.service_port,
                "password": mosquitto.password(mosquitto.cloud_username),
                "reconnect_min_s": 0.1, "reconnect_max_s": 1.0} | overrides.pop("mqtt", {})
        settings = CloudSettings.model_validate({
            "instance": instance, "topic_root": topics.root,
            "data_dir": data_dir or tmp_path / instance, "mqtt": mqtt,
            "ingest": {"flush_interval_s": 0.05} | overrides.pop("ingest", {}),
            "alerts": {"rules_file": rules, "tick_interval_s": 0.1} | overrides.pop("alerts", {}),
            **overrides,
        })
        cloud = RunningCloud(settings)
        clouds.append(cloud)
        if start:
            cloud.start()
        return cloud

    yield factory
    for cloud in clouds:
        cloud.stop()
