"""Fixtures: a real Mosquitto from edgefl's own config, and a topic root per test."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.errors import BrokerStartError
from broker.launcher import MosquittoProcess, find_mosquitto, free_port
from broker.provision import Identity, add_identity, init_broker, write_config_files
from broker.settings import BrokerSettings, TlsListenerSettings
from schemas.topics import Topics
from tests.mqtt_client import SyncClient, TlsFiles

pytest_plugins = ["tests.agent_fixtures", "tests.cloud_fixtures", "tests.victoria"]

# Devices provisioned when the broker starts; more can be added (with a reload).
DEVICE_IDS = (*tuple(f"dev-{i}" for i in range(600)), "dev-tls",
              *tuple(f"sim-{i:03d}" for i in range(10)))
FREE_IDS = iter(DEVICE_IDS[20:590])  # dev-590.. are kept for tests that name them
"""Ids handed out one per use by `new_device_id`, so persistent sessions never mix."""
TEST_ROOT_FILTER = "+/edgefl/v1"
"""The ACL is rendered for this root so that each test's own root `t<hex>/edgefl/v1` is covered."""


@dataclass
class RunningBroker:
    """A Mosquitto started for the test session, with its identities."""

    host: str
    port: int
    tls_port: int
    settings: BrokerSettings
    process: MosquittoProcess
    identities: dict[str, Identity] = field(default_factory=dict)

    @property
    def service_port(self) -> int:
        """The service listener: the cloud identity connects there."""
        return self.settings.service_port

    @property
    def observer_port(self) -> int:
        """The observer listener (read-only identities)."""
        return self.settings.observer_port

    def port_for(self, username: str) -> int:
        """The listener of an identity (services and devices have one each)."""
        return self.service_port if username == self.cloud_username else self.port

    @property
    def cloud_username(self) -> str:
        """Username of the cloud identity."""
        return self.settings.cloud_username

    def password(self, username: str) -> str:
        """Password of a provisioned identity."""
        return self.identities[username].password()

    @property
    def tls_service_port(self) -> int:
        """The services' mTLS listener (the cloud's certificate; the services' CA only)."""
        return self.settings.tls.service_port

    def tls_files(self, username: str) -> TlsFiles:
        """CA of its listener, client certificate and key of an identity provisioned with TLS."""
        cert = self.identities[username].cert
        assert cert is not None, f"{username} has no certificate"
        layout = self.settings.layout
        pki = layout.service_pki if username == self.cloud_username else layout.pki
        return TlsFiles(pki / "ca.crt", cert.cert, cert.key)

    def client(self, username: str, *, client_id: str | None = None, protocol: int = 5,
               will: tuple[str, bytes, bool] | None = None) -> SyncClient:
        """An unconnected client authenticated as ``username``."""
        return SyncClient(
            self.host, self.port_for(username),
            client_id=client_id or f"{username}-{uuid.uuid4().hex[:6]}",
            username=username, password=self.password(username), protocol=protocol, will=will,
        )

    def connected(self, username: str, **kwargs: object) -> SyncClient:
        """A connected client; fails the test when the broker refuses it."""
        client = self.client(username, **kwargs)  # type: ignore[arg-type]
        rc = client.connect()
        assert not rc.is_failure, f"{username} refused: {rc}"
        return client


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A real Mosquitto on free ports, configured by broker/ exactly as in production.

    The only difference from a production config is the ACL's topic root, which is
    `+/edgefl/v1` so every test can use its own root.
    """
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or "
                    "`sudo apt-get install mosquitto`")
    data: Path = tmp_path_factory.mktemp("mosquitto")
    settings = BrokerSettings(
        data_dir=data, port=free_port(), service_port=free_port(), observer_port=free_port(),
        topic_root=TEST_ROOT_FILTER,
        tls=TlsListenerSettings(enabled=True, port=free_port(), service_port=free_port()),
    )
    cloud = init_broker(settings, log_to_file=True)
    identities = {cloud.username: cloud}
    for device_id in DEVICE_IDS:
        identities[device_id] = add_identity(settings, device_id, tls=device_id == "dev-tls")
    config = write_config_files(settings, log_to_file=True)
    process = MosquittoProcess(
        config, settings.host, settings.port, log_file=settings.layout.log,
        pid_file=data / "mosquitto.pid",
    ).start()
    try:
        yield RunningBroker(settings.host, settings.port, settings.tls.port, settings, process,
                            identities)
    finally:
        process.stop()


@contextmanager
def own_mosquitto(folder: Path, device_ids: tuple[str, ...]) -> Iterator[RunningBroker]:
    """A Mosquitto of a test's own (persistence on) that the test may stop and restart.

    Free ports are picked, then bound by Mosquitto a moment later; a client connection of
    another test may take one in between (an ephemeral port): then new ports are picked.
    """
    for attempt in range(3):
        settings = BrokerSettings(data_dir=folder, port=free_port(), service_port=free_port(),
                                  observer_port=free_port(),
                                  topic_root=TEST_ROOT_FILTER, autosave_interval_s=1)
        cloud = init_broker(settings, log_to_file=True)
        identities = {cloud.username: cloud}
        for device_id in device_ids:
            identities[device_id] = add_identity(settings, device_id)
        config = write_config_files(settings, log_to_file=True)
        try:
            process = MosquittoProcess(config, settings.host, settings.port,
                                       log_file=settings.layout.log,
                                       pid_file=settings.layout.root / "mosquitto.pid").start()
            break
        except BrokerStartError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
            settings.layout.log.unlink(missing_ok=True)
    broker = RunningBroker(settings.host, settings.port, 0, settings, process, identities)
    try:
        yield broker
    finally:
        broker.process.stop()


@pytest.fixture
def restartable_mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """A Mosquitto of this test's own (persistence on) that the test may stop and restart."""
    with own_mosquitto(tmp_path / "broker", ("dev-a", "dev-b")) as broker:
        yield broker


@pytest.fixture
def new_device_id() -> Callable[[], str]:
    """Hands out a provisioned device id no other test has used in this session."""
    def take() -> str:
        device_id = next(FREE_IDS, None)
        if device_id is None:
            raise RuntimeError("the session's pool of provisioned device ids is used up: "
                               "raise the range of DEVICE_IDS in tests/conftest.py")
        return device_id
    return take


@pytest.fixture
def topics() -> Topics:
    """A topic root of this test's own, under the ACL's `+/edgefl/v1`."""
    return Topics(f"t{uuid.uuid4().hex[:12]}/edgefl/v1")


@pytest.fixture(autouse=True)
def fail_on_logged_exception(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail a test when an exception was only logged (e.g. inside a callback)."""
    yield
    if request.node.get_closest_marker("allow_logged_exceptions"):
        return
    logged = [
        r for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.exc_info is not None
    ]
    if logged:
        pytest.fail("exception logged during the test: " + "; ".join(
            f"{r.name}: {r.getMessage()}" for r in logged))
