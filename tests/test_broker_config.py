"""Rendering of mosquitto.conf, the ACL, password entries and the dev PKI."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from broker.config import render_acl, render_config
from broker.errors import ConfigError, CredentialError
from broker.passwords import PasswordFile, hash_password, verify_password
from broker.pki import DevCA
from broker.provision import add_identity, init_broker
from broker.settings import BrokerSettings, TlsListenerSettings


def test_config_has_fleet_settings(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path, port=1999)
    text = render_config(settings)
    lines = text.splitlines()
    assert "allow_anonymous false" in lines
    assert f"password_file {(tmp_path / 'passwd').resolve()}" in lines
    assert f"acl_file {(tmp_path / 'acl').resolve()}" in lines
    assert f"max_packet_size {16 * 1024 * 1024}" in lines
    assert "max_queued_messages 100000" in lines
    assert any(line.startswith("max_queued_bytes ") for line in lines)
    assert "persistence true" in lines
    assert f"persistence_location {(tmp_path / 'data').resolve()}/" in lines
    assert "listener 1999 127.0.0.1" in lines
    assert "require_certificate" not in text
    assert "set_tcp_nodelay true" in lines  # no 40 ms stalls on small packets


def test_tls_listener_with_mtls(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path, tls=TlsListenerSettings(enabled=True, port=8884))
    lines = render_config(settings).splitlines()
    assert "listener 8884 127.0.0.1" in lines
    assert "require_certificate true" in lines
    assert "use_identity_as_username true" in lines
    assert f"cafile {(tmp_path / 'pki' / 'ca.crt').resolve()}" in lines


def test_newline_in_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        render_config(BrokerSettings(data_dir=tmp_path / "evil\nlistener 1 0.0.0.0"))


def test_acl_uses_username_never_client_id() -> None:
    acl = render_acl("edgefl/v1", "edgefl-cloud")
    assert "%c" not in acl
    lines = acl.splitlines()
    assert "pattern write edgefl/v1/devices/%u/telemetry" in lines
    assert "pattern write edgefl/v1/fl/+/rounds/+/updates/%u" in lines
    assert "pattern read edgefl/v1/devices/%u/#" in lines
    assert "pattern read edgefl/v1/models/#" in lines
    # Devices never read each other's updates.
    assert not any(line.startswith("pattern read") and "updates" in line for line in lines)
    cloud_block = lines[lines.index("user edgefl-cloud"):]
    for topic in ("models/#", "fl/+/round", "fl/+/global/#", "alerts/#"):
        assert f"topic write edgefl/v1/{topic}" in cloud_block
    assert not any(line.startswith("pattern write") and "models/#" in line for line in lines)


@pytest.mark.parametrize("root", ["a b", "a/#", "", "a//b"])
def test_acl_refuses_bad_roots(root: str) -> None:
    with pytest.raises(ConfigError):
        render_acl(root, "edgefl-cloud")


def test_password_hash_format_and_verify() -> None:
    entry = hash_password("s3cret", salt=b"0123456789ab")
    assert entry.startswith("$7$101$")
    assert verify_password("s3cret", entry)
    assert not verify_password("wrong", entry)
    assert not verify_password("s3cret", "$6$garbage")


def test_password_file_is_private_and_never_holds_plaintext(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path)
    init_broker(settings)
    identity = add_identity(settings, "pi-01")
    password = identity.password()
    passwd = settings.layout.passwd
    assert password not in passwd.read_text()
    assert PasswordFile(passwd).check("pi-01", password)
    for secret in (passwd, identity.password_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # Idempotent: provisioning again keeps the password.
    assert add_identity(settings, "pi-01").password() == password


def test_cloud_username_is_reserved(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path)
    with pytest.raises(CredentialError):
        add_identity(settings, settings.cloud_username)


def test_dev_ca_issues_client_cert_with_device_cn(tmp_path: Path) -> None:
    ca = DevCA(tmp_path)
    ca.create()
    server = ca.issue_server(["localhost", "127.0.0.1"])
    client = ca.issue_client("pi-01")
    ca_cert = x509.load_pem_x509_certificate(ca.pair.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "pi-01"
    cert.verify_directly_issued_by(ca_cert)
    server_cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE(client.key.stat().st_mode) == 0o600


def test_missing_mosquitto_says_how_to_install(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import broker.cli
    import broker.launcher
    from broker.errors import MosquittoNotFoundError
    from broker.launcher import MosquittoProcess

    monkeypatch.setattr(broker.launcher, "find_mosquitto", lambda: None)
    with pytest.raises(MosquittoNotFoundError, match="apt-get install mosquitto"):
        MosquittoProcess(tmp_path / "mosquitto.conf", "127.0.0.1", 1883)
    result = CliRunner().invoke(broker.cli.app, ["--data-dir", str(tmp_path), "--port", "1"])
    assert result.exit_code == 2
    assert "apt-get install mosquitto" in result.output
