"""Device identity keys at provisioning (broker/device_identity.py): the broker's admin tool
certifies each device's Ed25519 key; secure aggregation accepts only what it certified."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.device_identity import IdentityAuthority, authority_id, load_identity_key
from broker.provision import add_identities, add_identity, init_broker, remove_identity
from broker.settings import BrokerSettings
from schemas import secagg
from schemas.base import decode_message
from schemas.secagg import (
    DeviceIdentity,
    SecAggDevice,
    SecAggError,
    SecAggServer,
    verify_identity,
)

REPO = Path(__file__).resolve().parents[1]


def _authority_public(data: Path) -> Ed25519PublicKey:
    raw = base64.b64decode((data / "secrets" / "identity-authority.pub").read_text().strip())
    return Ed25519PublicKey.from_public_bytes(raw)


def _device(data: Path, device_id: str) -> SecAggDevice:
    """A device set up from the files provisioning left for it."""
    folder = data / "secrets" / "identities"
    key = load_identity_key(folder / f"{device_id}.key")
    certificate = decode_message(DeviceIdentity, (folder / f"{device_id}.json").read_bytes())
    return SecAggDevice("digits", 1, 0, device_id, key, certificate, nonce="0" * 32)


def test_provisioning_certifies_each_device_and_keeps_what_it_issued(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "broker", port=1999)
    init_broker(settings)
    secrets = settings.layout.secrets
    pem = secrets / "identity-authority.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    authority = _authority_public(settings.layout.root)
    init_broker(settings)  # again: the same authority
    assert _authority_public(settings.layout.root).public_bytes_raw() == \
        authority.public_bytes_raw()
    assert not (secrets / "identities" / f"{settings.cloud_username}.key").exists()

    one = add_identity(settings, "pi-01")
    assert one.identity_key is not None
    assert stat.S_IMODE(one.identity_key.key.stat().st_mode) == 0o600
    certificate = decode_message(DeviceIdentity, one.identity_key.certificate.read_bytes())
    assert certificate.device_id == "pi-01"
    assert certificate.authority == authority_id(authority)
    certified = verify_identity(certificate, authority)
    key = load_identity_key(one.identity_key.key)
    assert certified.public_bytes_raw() == key.public_key().public_bytes_raw()
    add_identity(settings, "pi-01")  # again: the same key
    assert load_identity_key(one.identity_key.key).private_bytes_raw() == key.private_bytes_raw()

    many = add_identities(settings, ["pi-02", "pi-03"])
    for identity in many:
        assert identity.identity_key is not None
        verify_identity(decode_message(DeviceIdentity, identity.identity_key.certificate
                                       .read_bytes()), authority)

    # A damaged certificate is replaced by a new key and certificate.
    one.identity_key.certificate.write_text(json.dumps({"device_id": "pi-01"}))
    add_identity(settings, "pi-01")
    again = decode_message(DeviceIdentity, one.identity_key.certificate.read_bytes())
    assert verify_identity(again, authority).public_bytes_raw() != \
        key.public_key().public_bytes_raw()

    assert remove_identity(settings, "pi-02")
    assert not IdentityAuthority(secrets).files("pi-02").key.exists()
    assert not IdentityAuthority(secrets).files("pi-02").certificate.exists()


def test_add_device_says_where_the_identity_key_is(tmp_path: Path) -> None:
    data = tmp_path / "broker"
    done = subprocess.run([sys.executable, "-m", "edgefl", "broker", "add-device", "pi-9",
                           "--data-dir", str(data)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    key = data / "secrets" / "identities" / "pi-9.key"
    assert f"device pi-9: identity key {key}, certificate " in done.stdout
    assert key.exists()


def test_secure_aggregation_takes_provisioned_devices_and_refuses_another_fleets(
    tmp_path: Path,
) -> None:
    ours = BrokerSettings(data_dir=tmp_path / "ours", port=1999)
    theirs = BrokerSettings(data_dir=tmp_path / "theirs", port=1999)
    add_identities(ours, ["pi-01", "pi-02", "pi-03"])
    add_identities(theirs, ["pi-03"])  # the same id, certified by another authority
    authority = _authority_public(ours.layout.root)
    devices = [_device(ours.layout.root, d) for d in ("pi-01", "pi-02", "pi-03")]
    server = SecAggServer("digits", 1, 0, 2, 4, nonce="0" * 32)
    for device in devices:
        server.add_advert(device.advertise())
    devices[0].share_keys(server.close_adverts(), authority)

    devices = [_device(ours.layout.root, "pi-01"), _device(ours.layout.root, "pi-02"),
               _device(theirs.layout.root, "pi-03")]
    server = SecAggServer("digits", 1, 0, 2, 4, nonce="0" * 32)
    for device in devices:
        server.add_advert(device.advertise())
    with pytest.raises(SecAggError, match="bad_identity"):
        devices[0].share_keys(server.close_adverts(), authority)


def test_a_certificate_is_checked_once_per_authority_and_a_refused_one_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every round's roster carries every member's certificate again; each is checked
    once per process, under the authority it was checked with, and never a refusal."""
    ours = BrokerSettings(data_dir=tmp_path / "ours", port=1999)
    theirs = BrokerSettings(data_dir=tmp_path / "theirs", port=1999)
    add_identities(ours, ["pi-01"])
    add_identities(theirs, ["pi-01"])
    certificate = decode_message(DeviceIdentity, (
        ours.layout.secrets / "identities" / "pi-01.json").read_bytes())
    checked: list[str] = []

    def counting(identity: DeviceIdentity, authority: Ed25519PublicKey) -> Ed25519PublicKey:
        checked.append(identity.device_id)
        return verify_identity(identity, authority)

    monkeypatch.setattr(secagg, "verify_identity", counting)
    secagg._certified_raw.cache_clear()
    key = secagg._certified_key(certificate, _authority_public(ours.layout.root))
    again = secagg._certified_key(certificate, _authority_public(ours.layout.root))
    assert key.public_bytes_raw() == again.public_bytes_raw() and len(checked) == 1
    for _ in range(2):
        with pytest.raises(SecAggError, match="bad_identity"):
            secagg._certified_key(certificate, _authority_public(theirs.layout.root))
    assert len(checked) == 3


def test_broadcasts_of_rounds_a_device_is_not_in_are_not_counted_as_stale(
    tmp_path: Path,
) -> None:
    """Every member of a task receives every round's roster and survivors; a device not
    selected ignores them silently, while a message addressed to it is counted."""
    from edge_node.counters import Counters
    from edge_node.secagg_client import SecAggClient
    from edge_node.settings import SecAggSettings
    from schemas.secagg import ROSTER, SHARES, SURVIVORS, SecAggInbox, SecAggRoster, SecAggSurvivors
    from schemas.topics import TopicKind, Topics

    settings = BrokerSettings(data_dir=tmp_path / "broker", port=1999)
    add_identities(settings, ["pi-01"])
    secrets = settings.layout.secrets
    counters = Counters()
    client = SecAggClient("pi-01", Topics(), SecAggSettings(
        identity_key=secrets / "identities" / "pi-01.key",
        certificate=secrets / "identities" / "pi-01.json",
        authority_key=(secrets / "identity-authority.pub").read_text().strip()),
        publish=lambda *_a: None, counters=counters)
    session = {"task": "digits", "round": 4, "attempt": 0, "nonce": "0" * 32}
    roster = SecAggRoster(**session, threshold=2, devices=[])
    survivors = SecAggSurvivors(**session, devices=["pi-02", "pi-03"])
    client._message(TopicKind.SECAGG_BROADCAST, "digits", 4, ROSTER, roster.to_json())
    client._message(TopicKind.SECAGG_BROADCAST, "digits", 4, SURVIVORS, survivors.to_json())
    assert counters.snapshot().get("secagg_stale", 0) == 0
    inbox = SecAggInbox(**session, recipient="pi-01", ciphertexts={})
    client._message(TopicKind.SECAGG_INBOX, "digits", 4, SHARES, inbox.to_json())
    assert counters["secagg_stale"] == 1


def test_a_roster_whose_graph_is_not_the_round_plans_is_refused(tmp_path: Path) -> None:
    """A roster whose graph or thresholds are not the round plan's (a ring for the
    complete graph, a lower threshold) would let the relay learn more: refused, counted,
    and no share leaves the device. The plan's own roster is answered."""
    from edge_node.counters import Counters
    from edge_node.secagg_client import SecAggClient
    from edge_node.settings import SecAggSettings
    from schemas.fl import RoundPlan, SecAggSpec
    from schemas.secagg import ROSTER, SecAggAdvertise, SecAggRoster
    from schemas.topics import TopicKind, Topics
    from tests.examples import EXAMPLES

    settings = BrokerSettings(data_dir=tmp_path / "broker", port=1999)
    add_identities(settings, ["pi-01", "pi-02", "pi-03", "pi-04"])
    secrets = settings.layout.secrets
    example = EXAMPLES[RoundPlan]
    assert isinstance(example, RoundPlan)
    complete = example.model_copy(update={"secagg": SecAggSpec(threshold=3)})
    ring = example.model_copy(update={"secagg": SecAggSpec(threshold=3, neighbours=2,
                                                           neighbour_threshold=2)})

    def answer(plan: RoundPlan, graph: dict[str, int | None]) -> tuple[int, int]:
        """(shares sent by pi-01, its bad_roster count) for a roster of 4 with ``graph``."""
        counters = Counters()
        sent: dict[str, list[bytes]] = {}

        def outbox(device_id: str) -> Callable[[str, bytes], None]:
            return lambda _topic, payload: sent.setdefault(device_id, []).append(payload)

        clients = {d: SecAggClient(d, Topics(), SecAggSettings(
            identity_key=secrets / "identities" / f"{d}.key",
            certificate=secrets / "identities" / f"{d}.json",
            authority_key=(secrets / "identity-authority.pub").read_text().strip()),
            publish=outbox(d), counters=counters if d == "pi-01" else Counters())
            for d in ("pi-01", "pi-02", "pi-03", "pi-04")}
        for client in clients.values():
            client._begin("digits", plan)
        adverts = [SecAggAdvertise.model_validate_json(sent[d][0]) for d in sorted(sent)]
        roster = SecAggRoster(task="digits", round=plan.round, attempt=plan.attempt,
                              nonce=plan.nonce or "", devices=adverts, **graph)
        clients["pi-01"]._message(TopicKind.SECAGG_BROADCAST, "digits", plan.round, ROSTER,
                                  roster.to_json())
        return len(sent["pi-01"]) - 1, counters.snapshot().get("secagg_refused_bad_roster", 0)

    assert answer(complete, {"threshold": 3}) == (1, 0)
    assert answer(complete, {"threshold": 3, "neighbours": 2, "neighbour_threshold": 2}) \
        == (0, 1)
    assert answer(complete, {"threshold": 2}) == (0, 1)
    # A SecAgg+ plan: its own roster is answered; the complete graph, or another
    # threshold of holders, is not.
    assert answer(ring, {"threshold": 3, "neighbours": 2, "neighbour_threshold": 2}) == (1, 0)
    assert answer(ring, {"threshold": 3}) == (0, 1)
    assert answer(ring, {"threshold": 3, "neighbours": 2, "neighbour_threshold": 3}) == (0, 1)
