"""Against the real Mosquitto fixture: ACL, identity, LWT, retained binaries, mTLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.launcher import free_port, port_accepts
from broker.pki import DevCA
from schemas.base import decode_message, now
from schemas.device import DeviceState, HardwareInfo
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import wait_until
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient, TlsFiles

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
DELIVERED = {0x00, 0x10}  # success, or "no matching subscribers" (still accepted)


def test_device_writes_its_own_topics(mosquitto: RunningBroker, topics: Topics) -> None:
    cloud = mosquitto.connected(mosquitto.cloud_username)
    assert cloud.subscribe(topics.all()) == [1]
    device = mosquitto.connected("dev-0")
    for topic in (topics.telemetry("dev-0"), topics.model_metrics("dev-0", "m"),
                  topics.update("digits", 1, "dev-0"), topics.command_reply("dev-0", "ping")):
        assert device.publish(topic, b"{}") in DELIVERED
        assert cloud.wait_topic(topic).payload == b"{}"
    device.close()
    cloud.close()


@pytest.mark.parametrize("target", ["other_telemetry", "other_state", "release", "chunk",
                                    "round_plan", "alert", "other_update", "command"])
def test_mqtt5_device_is_refused_with_0x87(mosquitto: RunningBroker, topics: Topics,
                                           target: str) -> None:
    topic = {
        "other_telemetry": topics.telemetry("dev-2"),
        "other_state": topics.device_state("dev-2"),
        "release": topics.release("digits"),
        "chunk": topics.chunk("digits", "1.0", 0),
        "round_plan": topics.round_plan("digits"),
        "alert": topics.alert("dev-1", "cpu"),
        "other_update": topics.update("digits", 1, "dev-2"),
        "command": topics.command("dev-2", "rollback"),
    }[target]
    device = mosquitto.connected("dev-1")
    assert device.publish(topic, b"forged") == NOT_AUTHORIZED
    device.close()


def _denied_is_never_delivered(mosquitto: RunningBroker, topics: Topics, *, protocol: int,
                               client_id: str | None = None) -> None:
    cloud = mosquitto.connected(mosquitto.cloud_username)
    cloud.subscribe(topics.all())
    device = mosquitto.connected("dev-3", protocol=protocol, client_id=client_id)
    forged = topics.telemetry("dev-4")
    code = device.publish(forged, b"forged")
    # A sentinel on the device's own topic, published after the forged one on the same
    # connection: once it arrives, the forged message would have arrived before it.
    sentinel = topics.telemetry("dev-3")
    assert device.publish(sentinel, b"sentinel") in DELIVERED
    cloud.wait_topic(sentinel)
    assert cloud.received_on(forged) == []
    device.close()
    cloud.close()
    if protocol == 5:
        assert code == NOT_AUTHORIZED
    else:
        assert code == 0  # MQTT 3.1.1 cannot report the denial: PUBACK looks like success


def test_mqtt311_denial_is_silent_but_nothing_arrives(mosquitto: RunningBroker,
                                                      topics: Topics) -> None:
    _denied_is_never_delivered(mosquitto, topics, protocol=4)


def test_spoofed_client_id_does_not_grant_the_others_topics(mosquitto: RunningBroker,
                                                            topics: Topics) -> None:
    # dev-3 connects with client id "dev-4" but its own username and password.
    _denied_is_never_delivered(mosquitto, topics, protocol=5, client_id="dev-4")


def test_wrong_password_is_refused_at_connect(mosquitto: RunningBroker) -> None:
    for protocol in (5, 4):
        client = SyncClient(mosquitto.host, mosquitto.port, client_id="dev-5-x",
                            username="dev-5", password="not-the-password", protocol=protocol)
        rc = client.connect()
        assert rc.is_failure
        if protocol == 5:  # Mosquitto 2.0.11 answers 0x87; newer releases 0x86
            assert rc.value in (BAD_CREDENTIALS, NOT_AUTHORIZED)
        client.close()
    anonymous = SyncClient(mosquitto.host, mosquitto.port, client_id="anon")
    assert anonymous.connect().is_failure
    anonymous.close()


def test_device_never_receives_other_devices_updates(mosquitto: RunningBroker,
                                                     topics: Topics) -> None:
    # Mosquitto grants the SUBSCRIBE and applies read access per delivered message.
    spy = mosquitto.connected("dev-6")
    spy.subscribe(topics.filter(TopicKind.UPDATE, task="digits", round=1))
    spy.subscribe(topics.release("digits"))
    victim = mosquitto.connected("dev-9")
    update = topics.update("digits", 1, "dev-9")
    assert victim.publish(update, b"private delta") in DELIVERED
    cloud = mosquitto.connected(mosquitto.cloud_username)
    sentinel = topics.release("digits")
    assert cloud.publish(sentinel, b"{}") in DELIVERED
    spy.wait_topic(sentinel)
    assert spy.received_on(update) == []
    for client in (spy, victim, cloud):
        client.close()


def test_a_device_reads_its_own_secagg_inbox_only_and_writes_none(
    mosquitto: RunningBroker, topics: Topics,
) -> None:
    """Secure aggregation relays each device's encrypted shares to its own inbox: another
    device subscribing to every inbox gets nothing, and no device can fill an inbox."""
    owner = mosquitto.connected("dev-7")
    owner.subscribe(topics.secagg_inbox("digits", 1, "shares", "dev-7"))
    spy = mosquitto.connected("dev-8")
    spy.subscribe(topics.filter(TopicKind.SECAGG_INBOX, task="digits", round=1))
    sentinel = topics.round_plan("digits")  # every device reads it
    spy.subscribe(sentinel)
    cloud = mosquitto.connected(mosquitto.cloud_username)
    inbox = topics.secagg_inbox("digits", 1, "shares", "dev-7")
    assert cloud.publish(inbox, b"sealed shares") in DELIVERED
    assert owner.wait_topic(inbox).payload == b"sealed shares"
    assert spy.publish(topics.secagg_inbox("digits", 1, "shares", "dev-7"),
                       b"forged") == NOT_AUTHORIZED
    assert spy.publish(topics.secagg_inbox("digits", 1, "shares", "dev-8"),
                       b"forged") == NOT_AUTHORIZED
    assert cloud.publish(sentinel, b"{}") in DELIVERED  # after the inbox, same connection
    spy.wait_topic(sentinel)
    assert spy.received_on(inbox) == []
    assert [m.payload for m in owner.received_on(inbox)] == [b"sealed shares"]
    assert cloud.publish(sentinel, b"", retain=True) in DELIVERED
    for client in (owner, spy, cloud):
        client.close()


def test_lwt_offline_is_retained_with_matching_bdseq(mosquitto: RunningBroker,
                                                     topics: Topics) -> None:
    state_topic = topics.device_state("dev-7")
    bd_seq = 5
    will = DeviceState(device_id="dev-7", state="offline", bd_seq=bd_seq, ts=now(), reason="lwt")
    device = mosquitto.connected("dev-7", will=(state_topic, will.to_json(), True))
    birth = DeviceState(device_id="dev-7", state="online", bd_seq=bd_seq, ts=now(),
                        agent_version="test",
                        hardware=HardwareInfo(platform="Linux", machine="x86_64", cpu_count=2,
                                              memory_total_mb=1024.0))
    assert device.publish(state_topic, birth.to_json(), retain=True) in DELIVERED
    device.drop()

    late = mosquitto.connected(mosquitto.cloud_username)
    late.subscribe(state_topic)
    retained = late.wait_for(lambda m: m.topic == state_topic and m.retain
                             and decode_message(DeviceState, m.payload).state == "offline")
    state = decode_message(DeviceState, retained.payload)
    assert (state.state, state.bd_seq, state.reason) == ("offline", bd_seq, "lwt")
    late.close()


def test_4mib_retained_binary_reaches_a_late_subscriber_intact(mosquitto: RunningBroker,
                                                               topics: Topics) -> None:
    blob = os.urandom(4 * 1024 * 1024)
    topic = topics.chunk("big-model", "1.0.0", 0)
    cloud = mosquitto.connected(mosquitto.cloud_username)
    assert cloud.publish(topic, blob, retain=True) in DELIVERED
    cloud.close()
    late = mosquitto.connected("dev-8")
    assert late.subscribe(topic) == [1]
    got = late.wait_topic(topic)
    assert got.retain
    assert hashlib.sha256(got.payload).digest() == hashlib.sha256(blob).digest()
    late.close()
    # Clear the retained binary: retained messages live in broker RAM.
    cleaner = mosquitto.connected(mosquitto.cloud_username)
    assert cleaner.publish(topic, b"", retain=True) in DELIVERED
    cleaner.close()


def test_mtls_identity_is_the_certificate_cn(mosquitto: RunningBroker, topics: Topics) -> None:
    cloud = mosquitto.connected(mosquitto.cloud_username)
    cloud.subscribe(topics.all())
    device = SyncClient(mosquitto.host, mosquitto.tls_port, client_id="dev-tls",
                        tls=mosquitto.tls_files("dev-tls"))
    assert not device.connect().is_failure
    assert device.publish(topics.telemetry("dev-tls"), b"{}") in DELIVERED
    assert device.publish(topics.telemetry("dev-0"), b"{}") == NOT_AUTHORIZED
    cloud.wait_topic(topics.telemetry("dev-tls"))
    device.close()
    cloud.close()


def test_tls_listener_refuses_a_client_without_certificate(mosquitto: RunningBroker) -> None:
    files = mosquitto.tls_files("dev-tls")
    client = SyncClient(mosquitto.host, mosquitto.tls_port, client_id="no-cert",
                        username="dev-0", password=mosquitto.password("dev-0"))
    client.client.tls_set(ca_certs=str(files.ca))
    rc = client.connect(timeout=5)  # the broker aborts the TLS handshake
    assert rc.is_failure
    assert not client.client.is_connected()
    assert "did not return a certificate" in mosquitto.process.log_tail(50)
    client.close()


def test_passwords_are_not_in_the_broker_command_line(mosquitto: RunningBroker) -> None:
    cmdline = Path(f"/proc/{mosquitto.process.pid}/cmdline").read_bytes()
    for identity in mosquitto.identities.values():
        assert identity.password().encode() not in cmdline


def test_a_hundred_devices_are_provisioned_in_one_go(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from broker.passwords import PasswordFile

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "broker"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "broker", "add-device", "--range",
         "sim-000..sim-099", "--data-dir", str(data)],
        cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    passwd = PasswordFile(data / "passwd")
    ids = [f"sim-{i:03d}" for i in range(100)]
    for device_id in ids:
        secret = (data / "secrets" / f"{device_id}.password").read_text().strip()
        assert passwd.check(device_id, secret)
    assert elapsed < 30
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# more\npi-1\npi-2\n\n")
    again = subprocess.run(
        [sys.executable, "-m", "edgefl", "broker", "add-device", "--from-file",
         str(ids_file), "--data-dir", str(data)],
        cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert {"pi-1", "pi-2"} <= set(PasswordFile(data / "passwd").entries)
    bad = subprocess.run(
        [sys.executable, "-m", "edgefl", "broker", "add-device", "--range",
         "sim-010..dev-020", "--data-dir", str(data)],
        cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_bulk_provisioning_reloads_the_running_broker_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`add-device --range`: twenty identities, one reload of the running broker at the
    end (counted where the command calls it: SIGHUPs to a broker coalesce, so counting
    the broker's reloads could not tell one from twenty)."""
    from typer.testing import CliRunner

    import broker.cli as broker_cli
    from broker.passwords import PasswordFile
    from broker.settings import BrokerSettings

    reloads: list[Path] = []

    def reload(settings: BrokerSettings) -> bool:
        reloads.append(settings.data_dir)
        return True

    monkeypatch.setattr(broker_cli, "reload_running_broker", reload)
    data = tmp_path / "broker"
    result = CliRunner().invoke(broker_cli.app, ["add-device", "--range", "bulk-000..bulk-019",
                                                 "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert reloads == [data]
    assert {f"bulk-{i:03d}" for i in range(20)} <= set(PasswordFile(data / "passwd").entries)


def test_add_observer_from_the_command_line_reads_the_default_groups_only(
        tmp_path: Path) -> None:
    """`edgefl broker add-observer NAME`: its default groups, read lines only, 0600."""
    edgefl = [sys.executable, "-m", "edgefl", "broker"]
    data = str(tmp_path / "broker")
    for args in (["init", "--data-dir", data],
                 ["add-observer", "telegraf", "--data-dir", data]):
        result = subprocess.run([*edgefl, *args], capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, result.stderr
    acl = [line.split() for line in (tmp_path / "broker" / "acl-observers").read_text()
           .splitlines() if line.strip() and not line.startswith("#")]
    assert acl[0] == ["user", "telegraf"]
    assert all(line[:2] == ["topic", "read"] for line in acl[1:])
    root = Topics().root
    assert sorted(line[2] for line in acl[1:]) == sorted(
        f"{root}/{suffix}" for suffix in (
            "alerts/+/+", "devices/+/models/+/metrics", "devices/+/state",
            "devices/+/models/+/status", "fl/+/status", "devices/+/telemetry"))
    secret = tmp_path / "broker" / "secrets" / "telegraf.password"
    assert secret.stat().st_mode & 0o777 == 0o600
    bad = subprocess.run([*edgefl, "add-observer", "scada", "--data-dir", data, "--topics",
                          "telemetry,commands"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_an_observer_reads_what_it_was_given_and_writes_nothing(
    mosquitto: RunningBroker, topics: Topics, new_device_id: Callable[[], str],
) -> None:
    from broker.provision import add_observer, reload_running_broker
    from tests.agent_fixtures import wait_until

    name = f"telegraf-{uuid.uuid4().hex[:6]}"
    identity = add_observer(mosquitto.settings, name, ["telemetry", "alerts"])
    assert reload_running_broker(mosquitto.settings)

    def observer(client_id: str) -> SyncClient:
        return SyncClient(mosquitto.host, mosquitto.observer_port, client_id=client_id,
                          username=name, password=identity.password())

    clients: list[SyncClient] = []

    def connects() -> bool:
        client = observer(f"edgefl-cloud-{uuid.uuid4().hex[:4]}")  # a taken id: ignored
        if client.connect().is_failure:
            client.close()
            return False
        clients.append(client)
        return True

    wait_until(connects, what="observer accepted after the reload")
    watcher = clients[0]
    assert watcher.subscribe(topics.filter(TopicKind.TELEMETRY)) == [1]
    device_id = new_device_id()
    device = mosquitto.connected(device_id)
    assert device.publish(topics.telemetry(device_id), b"{}") in (0, 0x10)
    watcher.wait_topic(topics.telemetry(device_id))
    # Not given: Mosquitto grants the subscription but never delivers.
    watcher.subscribe(topics.filter(TopicKind.COMMAND_REPLY))
    assert device.publish(topics.command_reply(device_id, "ping"), b"{}") in (0, 0x10)
    assert device.publish(topics.telemetry(device_id), b"marker") in (0, 0x10)
    watcher.wait_for(lambda m: m.payload == b"marker")
    assert watcher.received_on(topics.command_reply(device_id, "ping")) == []
    for topic in (topics.telemetry(name), topics.telemetry(device_id),
                  topics.device_state(name), topics.alert(device_id, "x"),
                  topics.command(device_id, "ping"), topics.round_plan("t"),
                  topics.release("m"), topics.cloud_state()):
        assert watcher.publish(topic, b"{}") == 0x87, topic
    watcher.close()
    device.close()


def _refused_over_tls(mosquitto: RunningBroker, files: TlsFiles) -> bool:
    client = SyncClient(mosquitto.host, mosquitto.tls_port, client_id="rogue", tls=files)
    try:
        return client.connect(timeout=5).is_failure or not client.client.is_connected()
    finally:
        client.close()


def test_the_services_tls_listener_takes_only_certificates_of_the_services_ca(
    mosquitto: RunningBroker, topics: Topics,
) -> None:
    """The cloud's certificate comes from a CA of its own: devices cannot connect there.

    A device certificate on the services' listener could otherwise pick the cloud's
    client id and take its session; the services' listener does not trust the devices' CA.
    """
    cloud_files = mosquitto.tls_files(mosquitto.cloud_username)
    cloud = SyncClient(mosquitto.host, mosquitto.tls_service_port,
                       client_id=f"edgefl-cloud-{uuid.uuid4().hex[:6]}", tls=cloud_files)
    assert not cloud.connect().is_failure
    cloud.subscribe(topics.all())
    assert cloud.publish(topics.cloud_state(), b"", retain=True) in DELIVERED  # cloud rights
    device = SyncClient(mosquitto.host, mosquitto.tls_port, client_id="dev-tls",
                        tls=mosquitto.tls_files("dev-tls"))
    assert not device.connect().is_failure
    assert device.publish(topics.telemetry("dev-tls"), b"{}") in DELIVERED
    cloud.wait_topic(topics.telemetry("dev-tls"))
    device.close()
    cloud.close()
    device_files = mosquitto.tls_files("dev-tls")
    for port, files in (
        (mosquitto.tls_service_port, TlsFiles(cloud_files.ca, device_files.cert,
                                              device_files.key)),  # a device's certificate
        (mosquitto.tls_port, TlsFiles(device_files.ca, cloud_files.cert,
                                      cloud_files.key)),  # the cloud's, where devices are
    ):
        rogue = SyncClient(mosquitto.host, port, client_id="edgefl-cloud-rogue", tls=files)
        try:
            assert rogue.connect(timeout=5).is_failure or not rogue.client.is_connected()
        finally:
            rogue.close()
    bare = SyncClient(mosquitto.host, mosquitto.tls_service_port, client_id="no-cert",
                      username=mosquitto.cloud_username,
                      password=mosquitto.password(mosquitto.cloud_username))
    bare.client.tls_set(ca_certs=str(cloud_files.ca))
    assert bare.connect(timeout=5).is_failure  # a password is not a certificate
    bare.close()


def test_tls_listener_refuses_a_certificate_of_another_ca(mosquitto: RunningBroker,
                                                          tmp_path: Path) -> None:
    other = DevCA(tmp_path / "other-pki")
    other.create("someone else's CA")
    pair = other.issue_client("dev-tls")  # the same CN as a provisioned device
    assert _refused_over_tls(mosquitto, TlsFiles(mosquitto.tls_files("dev-tls").ca,
                                                 pair.cert, pair.key))


def test_tls_listener_refuses_an_expired_certificate(mosquitto: RunningBroker,
                                                     tmp_path: Path) -> None:
    pki = mosquitto.settings.layout.pki
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-tls")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(past - dt.timedelta(days=1)).not_valid_after(past)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "expired.crt", tmp_path / "expired.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    assert _refused_over_tls(mosquitto, TlsFiles(pki / "ca.crt", cert_path, key_path))
    # The same CA and CN with a valid certificate is let in: it was the date.
    assert not _refused_over_tls(mosquitto, mosquitto.tls_files("dev-tls"))


def test_a_fleet_connects_with_certificates(mosquitto: RunningBroker, topics: Topics,
                                            tmp_path: Path) -> None:
    pki = mosquitto.settings.layout.pki
    ids = ["tlsfleet-000", "tlsfleet-001"]
    for device_id in ids:
        DevCA(pki).issue_client(device_id)
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.all())
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "2", "--prefix", "tlsfleet-",
         "--broker", f"{mosquitto.host}:{mosquitto.tls_port}", "--tls-dir", str(pki),
         "--topic-root", topics.root, "--state-dir", str(tmp_path / "state"),
         "--interval", "0.5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for device_id in ids:  # born, and publishing as the identity of its certificate
            watcher.wait_topic(topics.telemetry(device_id), timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    assert proc.returncode == 0, out
    missing = subprocess.run(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "3", "--prefix", "tlsfleet-",
         "--tls-dir", str(pki), "--state-dir", str(tmp_path / "s2")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "tlsfleet-002" in missing.stderr, missing.stderr
    assert missing.stderr.count("\n") == 1


def test_a_removed_device_s_certificate_is_revoked_and_its_session_closed(
    tmp_path: Path,
) -> None:
    data = tmp_path / "broker"
    base = [sys.executable, "-m", "edgefl", "broker"]
    launcher, ports = _launch(base, data)
    clients: list[SyncClient] = []

    def connect(device_id: str) -> SyncClient:
        pki = data / "pki"
        client = SyncClient("127.0.0.1", ports["tls"], client_id=device_id, tls=TlsFiles(
            pki / "ca.crt", pki / "clients" / f"{device_id}.crt",
            pki / "clients" / f"{device_id}.key"))
        clients.append(client)
        return client

    try:
        for device_id in ("keep-1", "gone-1"):
            added = subprocess.run([*base, "add-device", device_id, "--tls", "--data-dir",
                                    str(data)], cwd=REPO, capture_output=True, text=True,
                                   timeout=60, check=False)
            assert added.returncode == 0, added.stderr
        kept, gone = connect("keep-1"), connect("gone-1")
        assert not kept.connect().is_failure and not gone.connect().is_failure
        # What the device holds (remove-device deletes the CA's copy of its key).
        revoked_cert = (data / "pki" / "clients" / "gone-1.crt").read_bytes()
        held = TlsFiles(data / "pki" / "ca.crt", tmp_path / "gone.crt", tmp_path / "gone.key")
        held.cert.write_bytes(revoked_cert)
        held.key.write_bytes((data / "pki" / "clients" / "gone-1.key").read_bytes())
        removed = subprocess.run([*base, "remove-device", "gone-1", "--data-dir", str(data)],
                                 cwd=REPO, capture_output=True, text=True, timeout=60,
                                 check=False)
        assert removed.returncode == 0, removed.stderr
        assert "certificate revoked" in removed.stdout
        assert "restarting to load the CRL" in removed.stdout, removed.stdout
        # The open session is closed (the broker restarts with the CRL) ...
        wait_until(lambda: not gone.client.is_connected(), timeout=30,
                   what="the revoked device disconnected")
        wait_until(lambda: port_accepts("127.0.0.1", ports["tls"]), timeout=30,
                   what="the TLS listener back")
        # ... the revoked certificate is refused from then on, another device's is not.
        keep_again = connect("keep-1")
        assert not keep_again.connect().is_failure
        retry = SyncClient("127.0.0.1", ports["tls"], client_id="gone-1", tls=held)
        clients.append(retry)
        assert retry.connect(timeout=5).is_failure or not retry.client.is_connected()
        assert not (data / "pki" / "clients" / "gone-1.key").exists()
        serial = x509.load_pem_x509_certificate(revoked_cert).serial_number
        assert serial in DevCA(data / "pki").revoked()
    finally:
        for client in clients:
            client.close()
        launcher.send_signal(signal.SIGTERM)
        try:
            out, _ = launcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            out, _ = launcher.communicate()
    assert launcher.returncode == 0, out
    assert "restarted" in out and "to load the CRL" in out, out


def _launch(base: list[str], data: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """``edgefl broker --tls`` on free ports, listening; new ports if one was taken meanwhile
    (a client connection of another test may hold a port picked free a moment before)."""
    for _ in range(3):
        ports = {name: free_port() for name in ("device", "tls", "service", "observer")}
        launcher = subprocess.Popen(
            [*base, "--data-dir", str(data), "--tls", "--port", str(ports["device"]),
             "--tls-port", str(ports["tls"]), "--service-port", str(ports["service"]),
             "--observer-port", str(ports["observer"])],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: launcher.poll() is not None  # noqa: B023 - polled in this loop
                   or port_accepts("127.0.0.1", ports["tls"]), timeout=30,  # noqa: B023
                   what="the TLS listener")
        if launcher.poll() is None:
            return launcher, ports
        out, _ = launcher.communicate()
        assert "already in use" in out, out
    raise AssertionError("no free ports for the broker after 3 attempts")
