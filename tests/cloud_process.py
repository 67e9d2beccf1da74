"""The cloud service as its own process (`edgefl cloud --config`), to kill and restart."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from schemas.topics import Topics
from tests.agent_fixtures import wait_until
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

REPO = Path(__file__).resolve().parents[1]


class CloudProcess:
    """``python -m edgefl cloud --config FILE`` against a test broker."""

    def __init__(self, broker: RunningBroker, topics: Topics, folder: Path, *,
                 instance: str, **settings: Any) -> None:
        self.broker = broker
        self.topics = topics
        self.folder = folder
        self.instance = instance
        folder.mkdir(parents=True, exist_ok=True)
        password = folder / "cloud.password"
        password.write_text(broker.password(broker.cloud_username))
        mqtt = {"host": broker.host, "port": broker.service_port, "password_file": str(password),
                "reconnect_min_s": 0.1, "reconnect_max_s": 0.5} | settings.pop("mqtt", {})
        self.config = folder / "cloud.yaml"
        self.config.write_text(yaml.safe_dump({
            "instance": instance, "topic_root": topics.root, "data_dir": str(folder / "data"),
            "mqtt": mqtt,
            "ingest": {"flush_interval_s": 0.05} | settings.pop("ingest", {}),
            **settings,
        }))
        self.store = folder / "data" / "edgefl.sqlite3"
        self.log = folder / "cloud.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, wait_online: bool = True) -> CloudProcess:
        """Start it; by default wait (bounded) until it announced itself online."""
        watcher = None
        if wait_online:
            watcher = SyncClient(self.broker.host, self.broker.service_port,
                                 client_id=f"watch-{self.instance}-{self.starts}",
                                 username=self.broker.cloud_username,
                                 password=self.broker.password(self.broker.cloud_username))
            assert not watcher.connect().is_failure
            watcher.subscribe(self.topics.cloud_state())
        started = time.time()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefl", "--log-level", "INFO", "cloud",
                 "--config", str(self.config)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        if watcher is not None:
            try:
                watcher.wait_for(lambda m: bool(m.payload)
                                 and json.loads(m.payload)["state"] == "online"
                                 and json.loads(m.payload)["ts"] >= started, timeout=30)
            finally:
                watcher.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no flush, no offline state, nothing acknowledged that was not stored."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait (bounded); returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Kill it if it still runs (test teardown)."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Query its store (WAL: readable while it runs)."""
        if not self.store.exists():
            return []
        db = sqlite3.connect(self.store, timeout=10)
        try:
            return list(db.execute(sql, params).fetchall())
        except sqlite3.OperationalError:  # not created yet
            return []
        finally:
            db.close()

    def telemetry_seqs(self, device_id: str) -> dict[str, list[int]]:
        """Stored telemetry seqs per session of a device (sorted, duplicates kept)."""
        out: dict[str, list[int]] = {}
        for session, seq in self.rows("SELECT session_id, seq FROM telemetry WHERE device_id=? "
                                      "ORDER BY session_id, seq", (device_id,)):
            out.setdefault(session, []).append(int(seq))
        return out

    def wait_stored(self, expected: dict[str, dict[str, int]], timeout: float = 60.0) -> None:
        """Wait until each device's sessions have their expected message counts stored."""
        def done() -> bool:
            return all(
                {s: len(q) for s, q in self.telemetry_seqs(d).items()} == sessions
                for d, sessions in expected.items())
        try:
            wait_until(done, timeout=timeout, what="every telemetry message stored")
        except TimeoutError:
            for device_id, sessions in expected.items():
                stored = self.telemetry_seqs(device_id)
                for session, count in sessions.items():
                    missing = sorted(set(range(count)) - set(stored.get(session, [])))
                    if missing:
                        print(f"{device_id}/{session}: {len(missing)} of {count} missing: "
                              f"{missing[:20]}")
            raise
