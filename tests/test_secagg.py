"""Secure aggregation's two state machines (schemas/secagg.py), in one process: the sum is
exact with and without dropouts, the server's transcript hides every input, and every
message a dishonest party could bend is refused."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from schemas import secagg
from schemas.fl import SecAggSpec
from schemas.secagg import (
    DeviceIdentity,
    SecAggDevice,
    SecAggError,
    SecAggInbox,
    SecAggRoster,
    SecAggServer,
    SecAggSurvivors,
)

TASK, ROUND, ATTEMPT = "digits", 3, 0
NONCE = "0123456789abcdef" * 2
"""The round plan's nonce."""
BITS, CLIP = 16, 1.0


@dataclass
class Round:
    """A round run to its end: what the server returned and what it saw."""

    total: np.ndarray
    expected: np.ndarray
    survivors: list[str]
    inputs: dict[str, np.ndarray]
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    transcript: list[bytes] = field(default_factory=list)


AUTHORITY = Ed25519PrivateKey.generate()
"""The fleet's identity authority (provisioning); devices hold its public key."""
AUTHORITY_PUBLIC = AUTHORITY.public_key()
T0 = 1_790_000_000.5  # not integral: json.dumps and RFC 8785 write it alike


def _identity(device_id: str, authority: Ed25519PrivateKey = AUTHORITY,
              certified_as: str | None = None) -> tuple[Ed25519PrivateKey, DeviceIdentity]:
    key = Ed25519PrivateKey.generate()
    return key, secagg.issue_identity(authority, "fleet", certified_as or device_id,
                                      key.public_key(), T0)


def device(device_id: str, authority: Ed25519PrivateKey = AUTHORITY,
           certified_as: str | None = None) -> SecAggDevice:
    """A device with an identity key certified (by default by the fleet's authority)."""
    return SecAggDevice(TASK, ROUND, ATTEMPT, device_id,
                        *_identity(device_id, authority, certified_as), nonce=NONCE)


def fleet(count: int) -> dict[str, SecAggDevice]:
    return {f"dev-{i:02d}": device(f"dev-{i:02d}") for i in range(count)}


def run_round(count: int, threshold: int, size: int = 1000, *, seed: int = 7,
              silent: frozenset[str] = frozenset(), drop_after_keys: frozenset[str] = frozenset(),
              drop_after_shares: frozenset[str] = frozenset(),
              drop_after_masked: frozenset[str] = frozenset(),
              neighbours: int | None = None, neighbour_threshold: int | None = None,
              places_after_shares: tuple[int, ...] = (),
              places_after_masked: tuple[int, ...] = ()) -> Round:
    """Every stage through the server, with devices that stop after the stage named.

    ``places_after_*``: the devices at these places of the graph's order (known once the
    roster is out) stop after that stage too: a block of neighbours.
    """
    rng = np.random.default_rng(seed)
    devices = fleet(count)
    server = SecAggServer(TASK, ROUND, ATTEMPT, threshold, size, nonce=NONCE,
                          neighbours=neighbours, neighbour_threshold=neighbour_threshold)
    transcript: list[bytes] = []
    for d, device in devices.items():
        advert = device.advertise()
        if d not in silent:
            transcript.append(advert.to_json())
            server.add_advert(advert)
    roster = server.close_adverts()
    order = secagg.neighbour_graph(roster).order
    drop_after_shares |= {order[i] for i in places_after_shares}
    drop_after_masked |= {order[i] for i in places_after_masked}
    for d in sorted(server.adverts):
        if d not in drop_after_keys:
            shares = devices[d].share_keys(roster, AUTHORITY_PUBLIC)
            transcript.append(shares.to_json())
            server.add_shares(shares)
    inboxes = server.close_shares()
    inputs, masked = {}, {}
    for d, inbox in inboxes.items():
        update = rng.normal(0.0, 0.3, size)
        inputs[d] = secagg.quantize(update, CLIP, BITS, rng)
        if d not in drop_after_shares:
            y = devices[d].masked_input(inbox, inputs[d])
            masked[d] = y
            transcript.append(y.tobytes())
            server.add_masked(d, y)
    survivors = server.close_masked()
    for d in survivors.devices:
        answer = devices[d].unmask(survivors)
        if d not in drop_after_masked:
            transcript.append(answer.to_json())
            server.add_unmask(answer)
    total = server.finish()
    expected = np.zeros(size, dtype=np.uint64)
    for d in survivors.devices:
        expected += inputs[d]
    return Round(total, expected, survivors.devices, inputs, masked, transcript)


def test_the_sum_is_exact_and_its_mean_is_the_mean_of_the_updates() -> None:
    result = run_round(8, 5)
    assert result.total.dtype == np.uint32
    np.testing.assert_array_equal(result.total, result.expected)  # no wrap: 8 * 2^16 < 2^32
    mean = secagg.dequantize_sum(result.total, 8, CLIP, BITS) / 8
    plain = np.mean([secagg.dequantize_sum(q, 1, CLIP, BITS) for q in result.inputs.values()],
                    axis=0)
    np.testing.assert_allclose(mean, plain, atol=1e-9)


@pytest.mark.parametrize(("silent", "after_keys", "after_shares", "after_masked"), [
    ({"dev-02"}, set(), set(), set()),                   # never advertised
    (set(), {"dev-03"}, set(), set()),                   # advertised keys, then gone
    (set(), set(), {"dev-01", "dev-06"}, set()),         # shared keys: its masks are in others'
    (set(), set(), set(), {"dev-00", "dev-07"}),         # sent its input, not its shares
    ({"dev-03"}, {"dev-02"}, {"dev-04"}, {"dev-05"}),    # one of each
], ids=["before_keys", "after_keys", "after_shares", "after_input", "mixed"])
def test_dropouts_leave_the_exact_sum_of_the_survivors(
    silent: set[str], after_keys: set[str], after_shares: set[str], after_masked: set[str],
) -> None:
    result = run_round(8, 4, silent=frozenset(silent), drop_after_keys=frozenset(after_keys),
                       drop_after_shares=frozenset(after_shares),
                       drop_after_masked=frozenset(after_masked))
    assert set(result.survivors) == ({f"dev-{i:02d}" for i in range(8)} - silent - after_keys
                                     - after_shares)
    np.testing.assert_array_equal(result.total, result.expected)


def test_below_the_threshold_each_stage_stops() -> None:
    with pytest.raises(SecAggError, match="too_few"):
        run_round(5, 4, silent=frozenset({"dev-00", "dev-01"}))
    with pytest.raises(SecAggError, match="too_few"):
        run_round(5, 4, drop_after_keys=frozenset({"dev-00", "dev-01"}))
    with pytest.raises(SecAggError, match="too_few"):
        run_round(5, 4, drop_after_shares=frozenset({"dev-00", "dev-01"}))
    with pytest.raises(SecAggError, match="too_few"):  # 3 unmasking answers of 4 needed
        run_round(5, 4, drop_after_masked=frozenset({"dev-00", "dev-01"}))


def test_the_server_sees_uniform_noise_not_an_update() -> None:
    """A device whose update is all zeros (its quantized value a constant): its masked
    input, the only thing of it the server holds, passes a uniformity test, and no secret
    of any device appears in anything the server received."""
    result = run_round(4, 3, size=200_000, seed=11)
    for d, y in result.masked.items():
        top = (y >> np.uint32(24)).astype(np.int64)  # 256 buckets of the uint32 range
        observed = np.bincount(top, minlength=256)
        p = stats.chisquare(observed).pvalue
        assert p > 1e-6, (d, p)
        assert not np.array_equal(y, result.inputs[d])
        # The input is not recoverable by removing any other device's masked input.
        for other, z in result.masked.items():
            if other != d:
                assert np.mean((y - z) == result.inputs[d]) < 1e-3
    assert stats.chisquare(np.bincount((result.masked["dev-00"] & np.uint32(255)).astype(
        np.int64), minlength=256)).pvalue > 1e-6


def test_no_device_secret_is_in_the_servers_transcript() -> None:
    devices = fleet(4)
    server = SecAggServer(TASK, ROUND, ATTEMPT, 3, 10, nonce=NONCE)
    transcript = b""
    for device in devices.values():
        advert = device.advertise()
        transcript += advert.to_json()
        server.add_advert(advert)
    roster = server.close_adverts()
    for device in devices.values():
        shares = device.share_keys(roster, AUTHORITY_PUBLIC)
        transcript += shares.to_json()
        server.add_shares(shares)
    secrets_ = [s for device in devices.values()
                for s in (device.seed, device.s_key.private_bytes_raw(),
                          device.c_key.private_bytes_raw())]
    for secret in secrets_:
        assert secret not in transcript and base64.b64encode(secret) not in transcript


def test_a_device_reveals_one_share_per_device_never_both() -> None:
    devices = fleet(5)
    server = SecAggServer(TASK, ROUND, ATTEMPT, 3, 4, nonce=NONCE)
    for device in devices.values():
        server.add_advert(device.advertise())
    roster = server.close_adverts()
    for device in devices.values():
        server.add_shares(device.share_keys(roster, AUTHORITY_PUBLIC))
    inboxes = server.close_shares()
    for d, device in devices.items():
        device.masked_input(inboxes[d], np.zeros(4, np.uint32))
    survivors = SecAggSurvivors(task=TASK, round=ROUND, attempt=ATTEMPT, nonce=NONCE,
                                devices=["dev-00", "dev-01", "dev-02"])
    answer = devices["dev-00"].unmask(survivors)
    assert set(answer.seed_shares) == {"dev-00", "dev-01", "dev-02"}
    assert set(answer.key_shares) == {"dev-03", "dev-04"}
    with pytest.raises(SecAggError, match="out_of_order"):  # a second list would reveal more
        devices["dev-00"].unmask(survivors.model_copy(update={"devices": ["dev-00", "dev-03",
                                                                          "dev-04"]}))


def _roster_of(count: int, threshold: int, **replace: SecAggDevice,
               ) -> tuple[dict[str, SecAggDevice], SecAggRoster]:
    devices = fleet(count) | replace
    server = SecAggServer(TASK, ROUND, ATTEMPT, threshold, 4, nonce=NONCE)
    for device in devices.values():
        server.add_advert(device.advertise())
    return devices, server.close_adverts()


def test_a_roster_with_forged_or_substituted_keys_is_refused() -> None:
    devices, roster = _roster_of(4, 3)
    forged = roster.devices[1].model_copy(update={"s_public": roster.devices[2].s_public})
    bent = roster.model_copy(update={"devices": [roster.devices[0], forged,
                                                 *roster.devices[2:]]})
    with pytest.raises(SecAggError, match="bad_signature"):
        devices["dev-00"].share_keys(bent, AUTHORITY_PUBLIC)
    # An identity the cloud made up (another authority), or another device's certificate.
    devices, roster = _roster_of(4, 3, **{"dev-03": device(
        "dev-03", authority=Ed25519PrivateKey.generate())})
    with pytest.raises(SecAggError, match="bad_identity"):
        devices["dev-00"].share_keys(roster, AUTHORITY_PUBLIC)
    devices, roster = _roster_of(4, 3, **{"dev-03": device("dev-03",
                                                                   certified_as="dev-02")})
    with pytest.raises(SecAggError, match="bad_identity"):
        devices["dev-00"].share_keys(roster, AUTHORITY_PUBLIC)
    devices, roster = _roster_of(4, 3)
    without_me = roster.model_copy(update={"devices": roster.devices[1:]})
    with pytest.raises(SecAggError, match="bad_roster"):
        devices["dev-00"].share_keys(without_me, AUTHORITY_PUBLIC)
    devices, roster = _roster_of(4, 3)
    with pytest.raises(SecAggError, match="too_few"):  # the server lowered the threshold
        devices["dev-00"].share_keys(roster.model_copy(update={
            "devices": roster.devices[:2], "threshold": 3}), AUTHORITY_PUBLIC)
    devices, roster = _roster_of(4, 3)
    with pytest.raises(SecAggError, match="bad_roster"):
        devices["dev-00"].share_keys(roster.model_copy(update={"round": ROUND + 1}),
                                     AUTHORITY_PUBLIC)


def test_a_ciphertext_moved_or_altered_by_the_relay_does_not_decrypt() -> None:
    devices, roster = _roster_of(3, 2)
    sent = {d: device.share_keys(roster, AUTHORITY_PUBLIC) for d, device in devices.items()}
    # The relay gives dev-00 what dev-01 encrypted for dev-02.
    moved = SecAggInbox(task=TASK, round=ROUND, attempt=ATTEMPT, nonce=NONCE, recipient="dev-00",
                        ciphertexts={"dev-01": sent["dev-01"].ciphertexts["dev-02"]})
    with pytest.raises(SecAggError, match="bad_ciphertext"):
        devices["dev-00"].masked_input(moved, np.zeros(4, np.uint32))
    devices, roster = _roster_of(3, 2)
    sent = {d: device.share_keys(roster, AUTHORITY_PUBLIC) for d, device in devices.items()}
    blob = bytearray(base64.b64decode(sent["dev-01"].ciphertexts["dev-00"]))
    blob[-1] ^= 1
    altered = SecAggInbox(task=TASK, round=ROUND, attempt=ATTEMPT, nonce=NONCE, recipient="dev-00",
                          ciphertexts={"dev-01": base64.b64encode(bytes(blob)).decode()})
    with pytest.raises(SecAggError, match="bad_ciphertext"):
        devices["dev-00"].masked_input(altered, np.zeros(4, np.uint32))


def test_shares_that_do_not_rebuild_a_dropped_key_are_caught() -> None:
    devices = fleet(5)
    server = SecAggServer(TASK, ROUND, ATTEMPT, 3, 4, nonce=NONCE)
    for device in devices.values():
        server.add_advert(device.advertise())
    roster = server.close_adverts()
    for device in devices.values():
        server.add_shares(device.share_keys(roster, AUTHORITY_PUBLIC))
    inboxes = server.close_shares()
    for d, device in devices.items():
        y = device.masked_input(inboxes[d], np.ones(4, np.uint32))
        if d != "dev-04":  # dev-04 drops: its key is rebuilt from shares
            server.add_masked(d, y)
    survivors = server.close_masked()
    answers = [devices[d].unmask(survivors) for d in survivors.devices]
    share = bytearray(base64.b64decode(answers[0].key_shares["dev-04"]))
    share[-1] ^= 1  # a dishonest survivor
    answers[0] = answers[0].model_copy(update={"key_shares": {
        "dev-04": base64.b64encode(bytes(share)).decode()}})
    for answer in answers:
        server.add_unmask(answer)
    with pytest.raises(SecAggError, match="bad_shares"):
        server.finish()


def test_the_server_takes_only_what_each_stage_expects() -> None:
    devices, roster = _roster_of(3, 2)
    server = SecAggServer(TASK, ROUND, ATTEMPT, 2, 4, nonce=NONCE)
    for advert in roster.devices:
        server.add_advert(advert)
    server.close_adverts()
    shares = devices["dev-00"].share_keys(roster, AUTHORITY_PUBLIC)
    with pytest.raises(SecAggError, match="bad_shares"):  # a recipient left out
        server.add_shares(shares.model_copy(update={"ciphertexts": {
            "dev-01": shares.ciphertexts["dev-01"]}}))
    with pytest.raises(SecAggError, match="wrong_round"):
        server.add_shares(shares.model_copy(update={"round": ROUND + 1}))
    server.add_shares(shares)
    server.add_shares(devices["dev-01"].share_keys(roster, AUTHORITY_PUBLIC))
    server.close_shares()
    with pytest.raises(SecAggError, match="not_expected"):  # dev-02 did not share keys
        server.add_masked("dev-02", np.zeros(4, np.uint32))
    with pytest.raises(SecAggError, match="bad_input"):
        server.add_masked("dev-00", np.zeros(5, np.uint32))
    with pytest.raises(SecAggError, match="bad_input"):
        server.add_masked("dev-00", np.zeros(4, np.float32))


def test_the_prg_is_chacha20_as_rfc_8439_defines_it() -> None:
    """RFC 8439 appendix A.1, test vector 1: all-zero key and nonce, block counter 0."""
    keystream = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    assert secagg.expand(bytes(32), 16).astype("<u4").tobytes() == keystream


def test_both_ends_derive_the_same_keys_bound_to_the_round() -> None:
    a, b = (X25519PrivateKey.generate() for _ in range(2))
    context = secagg.round_context(TASK, ROUND, ATTEMPT, NONCE)
    ab = secagg.agree(a, b.public_key().public_bytes_raw(), context, secagg.MASK_LABEL)
    ba = secagg.agree(b, a.public_key().public_bytes_raw(), context, secagg.MASK_LABEL)
    assert ab == ba and len(ab) == 32
    other = secagg.round_context(TASK, ROUND, ATTEMPT + 1, NONCE)
    assert secagg.agree(a, b.public_key().public_bytes_raw(), other, secagg.MASK_LABEL) != ab
    assert secagg.agree(a, b.public_key().public_bytes_raw(), context,
                        secagg.ENCRYPTION_LABEL) != ab
    # Fields are length-prefixed: ("ab", 1) and ("a", "b1") differ.
    assert secagg.round_context("ab", 1, 0, NONCE) != secagg.round_context("a", 11, 0, NONCE)


def test_messages_of_another_opening_of_the_round_are_refused() -> None:
    """A task started over opens round 3, attempt 0 again; only the nonce differs."""
    old = SecAggDevice(TASK, ROUND, ATTEMPT, "dev-00", *_identity("dev-00"),
                       nonce="f" * 32)
    server = SecAggServer(TASK, ROUND, ATTEMPT, 2, 4, nonce=NONCE)
    with pytest.raises(SecAggError, match="wrong_round"):
        server.add_advert(old.advertise())  # a replayed advertisement
    devices = fleet(3)
    for d in devices.values():
        server.add_advert(d.advertise())
    roster = server.close_adverts()
    other = roster.model_copy(update={"nonce": "f" * 32})
    with pytest.raises(SecAggError, match="bad_roster"):
        devices["dev-00"].share_keys(other, AUTHORITY_PUBLIC)
    # The nonce is signed: an advertisement relabelled with the current one does not verify.
    forged = SecAggDevice(TASK, ROUND, ATTEMPT, "dev-09", *_identity("dev-09"),
                          nonce="f" * 32).advertise().model_copy(update={"nonce": NONCE})
    with pytest.raises(SecAggError, match="bad_signature"):
        devices["dev-01"].share_keys(roster.model_copy(
            update={"devices": [*roster.devices, forged]}), AUTHORITY_PUBLIC)
    assert secagg.round_context(TASK, ROUND, ATTEMPT, NONCE) != secagg.round_context(
        TASK, ROUND, ATTEMPT, "f" * 32)


def test_quantization_is_unbiased_and_within_range() -> None:
    rng = np.random.default_rng(5)
    values = np.array([-2.0, -1.0, -0.3, 0.0, 0.123456, 1.0, 5.0])
    draws = np.stack([secagg.quantize(values, CLIP, BITS, rng) for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= secagg.levels(BITS)
    back = secagg.dequantize_sum(draws.mean(axis=0), 1, CLIP, BITS)
    np.testing.assert_allclose(back, np.clip(values, -CLIP, CLIP), atol=2e-6)
    assert secagg.max_devices(16) == 65536 and secagg.max_devices(20) == 4096


def test_the_signed_bytes_are_rfc_8785_json_without_the_signature() -> None:
    one = device("dev-00")
    advert = one.advertise()
    body = json.loads(advert.to_json())
    del body["signature"]
    expected = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert secagg.advertise_signing_bytes(advert) == expected
    one.identity.public_key().verify(base64.b64decode(advert.signature), expected)
    certificate = json.loads(advert.identity.to_json())
    del certificate["signature"]
    AUTHORITY_PUBLIC.verify(base64.b64decode(advert.identity.signature), json.dumps(
        certificate, sort_keys=True, separators=(",", ":")).encode())


# -- SecAgg+ (Bell et al. 2020): a sparse neighbour graph -----------------------------------


def _sparse_roster(count: int, neighbours: int, threshold: int = 2,
                   neighbour_threshold: int | None = None, nonce: str = NONCE) -> SecAggRoster:
    server = SecAggServer(TASK, ROUND, ATTEMPT, threshold, 4, nonce=nonce,
                          neighbours=neighbours,
                          neighbour_threshold=neighbour_threshold or neighbours // 2 + 1)
    for d in fleet(count):
        server.add_advert(device(d).advertise().model_copy(update={"nonce": nonce}))
    return server.close_adverts()


def _connected_without(graph: secagg.Graph, removed: set[str]) -> bool:
    left = set(graph.neighbours) - removed
    start = next(iter(left))
    seen, todo = {start}, [start]
    while todo:
        for peer in graph.neighbours[todo.pop()] - removed - seen:
            seen.add(peer)
            todo.append(peer)
    return seen == left


def test_the_neighbour_graph_is_regular_symmetric_connected_and_fixed_by_the_roster() -> None:
    roster = _sparse_roster(50, 18, threshold=34, neighbour_threshold=13)
    graph = secagg.neighbour_graph(roster)
    assert graph.threshold == 13
    assert {len(peers) for peers in graph.neighbours.values()} == {18}
    for d, peers in graph.neighbours.items():
        assert d not in peers
        assert all(d in graph.neighbours[p] for p in peers)
    assert secagg.neighbour_graph(roster) == graph  # every party computes the same
    # Vertex connectivity k: no 17 drop-outs split it (here: 200 random sets of them).
    rng = np.random.default_rng(5)
    ids = sorted(graph.neighbours)
    for _ in range(200):
        assert _connected_without(graph, set(rng.choice(ids, 17, replace=False)))
    order = graph.order
    assert sorted(order) == ids and graph.degree == 18
    for start in range(50):  # two blocks of the order, the hardest cut, of 17 in all
        for first in range(1, 17):
            cut = {order[(start + i) % 50] for i in range(first)} | {
                order[(start + 25 + i) % 50] for i in range(17 - first)}
            assert _connected_without(graph, cut)
    # 18 (k) can split it: 9 and 9 on opposite sides of the order; the device and the
    # server both refuse to unmask past k - 1 drop-outs.
    assert not _connected_without(graph, {order[i] for i in (*range(9), *range(25, 34))})
    assert graph.splits_without(50, 32) and not graph.splits_without(50, 33)
    # Other keys (a new round's), another graph; the order is not the ids' order.
    other = secagg.neighbour_graph(_sparse_roster(50, 18, nonce="f" * 32))
    assert other.neighbours != graph.neighbours
    assert graph.neighbours["dev-00"] != {f"dev-{i:02d}" for i in (*range(1, 10),
                                                                    *range(41, 50))}
    # As many neighbours as the others, or more: the complete graph and its threshold.
    small = secagg.neighbour_graph(_sparse_roster(7, 6, threshold=5, neighbour_threshold=6))
    assert small.threshold == 5
    assert all(len(peers) == 6 for peers in small.neighbours.values())


def _advertised(count: int, threshold: int, size: int = 4, **graph: int,
                ) -> tuple[dict[str, SecAggDevice], SecAggServer, SecAggRoster]:
    """``count`` devices whose keys the server took, and the roster it sent back."""
    devices = fleet(count)
    server = SecAggServer(TASK, ROUND, ATTEMPT, threshold, size, nonce=NONCE,
                          **graph)  # type: ignore[arg-type]
    for member in devices.values():
        server.add_advert(member.advertise())
    return devices, server, server.close_adverts()


def test_with_neighbours_a_device_shares_and_masks_with_its_neighbours_only() -> None:
    devices, server, roster = _advertised(12, 6, size=8, neighbours=4, neighbour_threshold=3)
    graph = secagg.neighbour_graph(roster)
    sent = {d: device.share_keys(roster, AUTHORITY_PUBLIC) for d, device in devices.items()}
    for d, shares in sent.items():
        assert set(shares.ciphertexts) == graph.neighbours[d]
        assert set(devices[d].pair_keys) == graph.neighbours[d]  # 4 agreements, not 11
    # Shares to every other device (the complete graph's) are refused.
    everyone = sent["dev-00"].model_copy(update={"ciphertexts": {
        d: sent["dev-01"].ciphertexts.get(d, "") for d in devices if d != "dev-00"}})
    with pytest.raises(SecAggError, match="bad_shares"):
        server.add_shares(everyone)
    for shares in sent.values():
        server.add_shares(shares)
    inboxes = server.close_shares()
    assert {d: set(inbox.ciphertexts) for d, inbox in inboxes.items()} == graph.neighbours
    # An inbox with shares from a device that is not a neighbour is refused.
    stranger = next(d for d in devices if d != "dev-00" and d not in graph.neighbours["dev-00"])
    bent = inboxes["dev-00"].model_copy(update={"ciphertexts": {
        **inboxes["dev-00"].ciphertexts, stranger: "AAAA"}})
    with pytest.raises(SecAggError, match="bad_inbox"):
        devices["dev-00"].masked_input(bent, np.zeros(8, np.uint32))


@pytest.mark.parametrize(("silent", "after_keys", "after_shares", "after_masked"), [
    (set(), set(), set(), set()),
    ({"dev-02"}, set(), set(), set()),
    (set(), {"dev-03"}, set(), set()),
    (set(), set(), {"dev-01", "dev-06", "dev-11"}, set()),
    (set(), set(), set(), {"dev-00", "dev-07"}),
    ({"dev-03"}, {"dev-12"}, {"dev-04"}, {"dev-05"}),
], ids=["none", "before_keys", "after_keys", "after_shares", "after_input", "mixed"])
def test_with_neighbours_dropouts_leave_the_exact_sum_of_the_survivors(
    silent: set[str], after_keys: set[str], after_shares: set[str], after_masked: set[str],
) -> None:
    result = run_round(20, 16, neighbours=8, neighbour_threshold=5,  # auto's for 20 at 0.8
                       silent=frozenset(silent), drop_after_keys=frozenset(after_keys),
                       drop_after_shares=frozenset(after_shares),
                       drop_after_masked=frozenset(after_masked))
    assert set(result.survivors) == ({f"dev-{i:02d}" for i in range(20)} - silent - after_keys
                                     - after_shares)
    np.testing.assert_array_equal(result.total, result.expected)


@pytest.mark.parametrize(("after_shares", "after_masked"), [
    ((0, 1, 2, 3), ()), ((), (5, 6, 7, 8)), ((0, 1), (2, 3)), ((0, 1), (10, 11)),
], ids=["block_after_shares", "block_after_input", "block_of_both", "two_blocks"])
def test_with_auto_neighbours_any_allowed_drop_outs_leave_the_exact_sum(
    after_shares: tuple[int, ...], after_masked: tuple[int, ...],
) -> None:
    """20 devices at 0.8: 16 needed, so 4 may drop out; auto gives k = 8 and 5 of 9
    holders. 4 neighbours in a row leave the devices beside them exactly 5 holders."""
    result = run_round(20, 16, neighbours=8, neighbour_threshold=5,
                       places_after_shares=after_shares, places_after_masked=after_masked)
    assert len(result.survivors) == 20 - len(after_shares)
    np.testing.assert_array_equal(result.total, result.expected)


def test_with_neighbours_as_many_drop_outs_as_the_degree_are_refused() -> None:
    """k = 4 and 4 devices gone in two pairs on opposite sides of the order: the graph
    may split in two, so the server stops, and a device told of those survivors refuses
    to send its shares."""
    with pytest.raises(SecAggError, match=r"too_few.*degree 4"):
        run_round(20, 10, neighbours=4, neighbour_threshold=3,
                  places_after_shares=(0, 1, 10, 11))
    devices, server, roster = _advertised(8, 2, neighbours=2, neighbour_threshold=2)
    for member in devices.values():
        server.add_shares(member.share_keys(roster, AUTHORITY_PUBLIC))
    inboxes = server.close_shares()
    order = secagg.neighbour_graph(roster).order
    me = order[0]
    devices[me].masked_input(inboxes[me], np.zeros(4, np.uint32))
    survivors = SecAggSurvivors(task=TASK, round=ROUND, attempt=ATTEMPT, nonce=NONCE,
                                devices=sorted(set(order) - {order[2], order[5]}))
    with pytest.raises(SecAggError, match="as many as the graph's degree 2"):
        devices[me].unmask(survivors)


def test_a_roster_smaller_than_the_graph_needs_is_the_complete_graph() -> None:
    """k = 4 planned, 5 devices advertised: every device is every other's neighbour and
    a secret needs the global threshold of shares."""
    graph = secagg.neighbour_graph(_sparse_roster(5, 4, threshold=3, neighbour_threshold=4))
    assert graph.degree is None and graph.threshold == 3
    assert all(len(peers) == 4 for peers in graph.neighbours.values())
    result = run_round(6, 3, neighbours=4, neighbour_threshold=4, silent=frozenset({"dev-05"}),
                       drop_after_shares=frozenset({"dev-01"}))
    np.testing.assert_array_equal(result.total, result.expected)


def test_with_neighbours_too_few_answers_in_one_neighbourhood_stop_the_round() -> None:
    """Every holder's share is needed (5 of 5): one survivor that does not answer the
    unmasking leaves its neighbours' seeds unrebuildable, though 11 of 12 answered."""
    with pytest.raises(SecAggError, match="too_few"):
        run_round(12, 6, neighbours=4, neighbour_threshold=5,
                  drop_after_masked=frozenset({"dev-03"}))


def test_the_task_config_gives_the_round_its_graph() -> None:
    from cloud.fl.config import SecAggConfig
    from cloud.fl.secagg_round import spec_for

    def graph(selected: int, share: float, neighbours: int | str | None = "auto",
              ) -> tuple[int, int | None, int | None]:
        spec = spec_for(selected, SecAggConfig(threshold=share, neighbours=neighbours))
        return spec.threshold, spec.neighbours, spec.neighbour_threshold

    # 50 selected, 45 needed: 5 may drop out, so k = 10 and a secret needs 11 - 5 = 6.
    assert graph(50, 0.9) == (45, 10, 6)
    assert graph(50, 2 / 3) == (34, 32, 17)  # 16 may drop out
    assert graph(10, 2 / 3) == (7, 6, 4)
    assert graph(5, 2 / 3) == (4, 2, 2)  # 1 may drop out: a ring, 2 of 3 holders
    assert graph(5, 0.5) == (3, None, None)  # k = 4 = selected - 1: the complete graph
    assert graph(50, 1.0) == (50, 2, 3)  # none may drop out: every holder is needed
    assert graph(50, 0.9, 16) == (45, 16, 12)  # more than auto's: kept
    assert graph(50, 0.9, 4) == (45, 10, 6)  # fewer: raised to auto's
    assert graph(50, 0.5, 8) == (25, None, None)  # 25 may drop: only the complete graph
    assert graph(50, 0.9, None) == (45, None, None)
    for selected in range(2, 120):  # whatever is allowed to drop, the sum survives
        for share in (0.5, 0.6, 2 / 3, 0.75, 0.8, 0.9, 0.95, 1.0):
            needed, k, t = graph(selected, share)
            if k is not None and t is not None:
                dropped = selected - needed
                assert k > dropped and t <= k + 1 - dropped and t > (k + 1) / 2
    for bad in (3, 0, -2):
        with pytest.raises(ValueError, match="even number"):
            SecAggConfig(neighbours=bad)
    with pytest.raises(ValueError, match="go together"):
        SecAggSpec(threshold=3, neighbours=4)
    for outside in (2, 6):  # not more than half of the 5 holders; more than all of them
        with pytest.raises(ValueError, match="more than half"):
            SecAggSpec(threshold=3, neighbours=4, neighbour_threshold=outside)
    with pytest.raises(ValueError, match="more than half"):  # the roster is checked alike
        SecAggRoster(task=TASK, round=ROUND, attempt=ATTEMPT, nonce=NONCE, threshold=2,
                     neighbours=4, neighbour_threshold=2, devices=[])


def test_a_device_given_its_plan_refuses_a_roster_with_another_graph() -> None:
    """The plan asks for SecAgg+ with k = 4 (3 of 5 holders); the relay's roster thins it
    to a ring, or drops it for the complete graph: refused before any share is made."""
    plan = SecAggSpec(threshold=6, neighbours=4, neighbour_threshold=3)
    for graph in ({"neighbours": 2, "neighbour_threshold": 2},
                  {"neighbours": None, "neighbour_threshold": None},
                  {"neighbours": 4, "neighbour_threshold": 3, "threshold": 5}):
        devices, _, roster = _advertised(12, 6, neighbours=4, neighbour_threshold=3)
        member = devices["dev-00"]
        member.spec = plan
        with pytest.raises(SecAggError, match="bad_roster"):
            member.share_keys(roster.model_copy(update=graph), AUTHORITY_PUBLIC)
        assert member.held == {}
    devices, _, roster = _advertised(12, 6, neighbours=4, neighbour_threshold=3)
    devices["dev-00"].spec = plan
    assert len(devices["dev-00"].share_keys(roster, AUTHORITY_PUBLIC).ciphertexts) == 4
