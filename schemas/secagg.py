"""Secure aggregation (Bonawitz et al., CCS 2017): what both sides compute, byte for byte.

The cloud relays and sums; it never holds a device's update in the clear. A round runs
four stages over MQTT (``fl/{t}/rounds/{r}/secagg/...``):

1. **advertise**: each selected device makes two X25519 key pairs for the round (``c``
   to encrypt shares, ``s`` to agree pairwise masks) and signs both public keys with
   its long-term Ed25519 identity key, sending along the :class:`DeviceIdentity` that
   certifies that key (issued at provisioning by the fleet's identity authority, whose
   public key every device holds; the cloud cannot issue one). The cloud broadcasts the
   roster ``U1`` of the devices that advertised (at least ``threshold``).
2. **shares**: each device checks the roster's signatures, picks its self-mask seed
   ``b_u``, and splits ``b_u`` and its ``s`` private key into ``threshold``-of-``|U1|``
   Shamir shares (:mod:`schemas.shamir`; device ``v`` gets the point at its 1-based
   place in ``U1``). Each peer's pair of shares is encrypted with AES-GCM under a key
   agreed from the ``c`` keys, bound to the round, the sender and the recipient. The
   cloud forwards to each device, in its own inbox, what was addressed to it; the
   senders are ``U2``.
3. **masked input**: each device clips and quantizes its update to integers
   (:func:`quantize`) and adds, modulo 2^32, its self mask ``PRG(b_u)`` and for every
   other ``v`` in ``U2`` the pairwise mask ``+PRG(s_uv)`` if ``u < v`` else
   ``-PRG(s_uv)``; ``s_uv`` is agreed from the ``s`` keys, so the pairwise masks cancel
   in the sum. The senders are ``U3``.
4. **unmask**: each device of ``U3`` reveals, for every ``v`` of ``U3``, its share of
   ``b_v``, and for every ``v`` of ``U2`` that dropped out, its share of ``v``'s ``s``
   key (never both for one device). From ``threshold`` answers the cloud removes the
   self masks of the survivors and the pairwise masks the dropped devices left in the
   survivors' inputs: what remains is the exact sum of the survivors' quantized updates.

With ``neighbours`` in the plan (SecAgg+, Bell et al. 2020), "every other device" above
becomes "every neighbour": each device shares its seed and key among itself and its
``k`` neighbours in the graph of :func:`neighbour_graph`, masks against the neighbours
only, and a secret needs ``neighbour_threshold`` of its ``k + 1`` shares; the cloud
stops, and devices refuse to unmask, once ``k`` devices of ``U1`` have dropped out.

The derivations (HKDF-SHA256 with the labels below, ChaCha20 as the PRG, the byte
layouts of :func:`round_context`, :func:`advertise_signing_bytes` and
:func:`share_aad`) are the wire contract: an implementation in another language that
follows them interoperates. X25519, Ed25519, HKDF, AES-GCM and ChaCha20 come from
``cryptography``; masks never come from numpy's generators.

This module holds the two state machines without any transport: :class:`SecAggDevice`
(one per device and round) and :class:`SecAggServer` (one per round).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Self

import numpy as np
import rfc8785
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field, StringConstraints, model_validator

from schemas import shamir
from schemas.base import Id, NonNegInt, RoundNonce, RoundNumber, UnixTime, Version, WireModel
from schemas.fl import (
    MAX_SELECTED,
    NeighbourCount,
    NeighbourThreshold,
    SecAggSpec,
    check_graph_parameters,
)

PROTOCOL = b"edgefl-secagg-v1"
ADVERTISE, ROSTER, SHARES, MASKED, SURVIVORS, UNMASK = (
    "advertise", "roster", "shares", "masked", "survivors", "unmask")
"""Stage names in the topics: devices send advertise, shares, masked and unmask on
``secagg/{stage}/{d}``; the cloud sends roster and survivors on ``secagg/{stage}`` and each
device's shares on ``secagg/shares/to/{d}``."""
MASKED_TENSOR = "masked"
"""The one tensor of a masked input: uint32, the update's shared tensors flattened in
sorted name order."""
MODULUS_BITS = 32
"""Masked inputs and their sum live in the integers modulo 2^32 (``uint32`` arithmetic)."""
KEY_BYTES = 32
SEED_BYTES = 32
NONCE_BYTES = 12
ENCRYPTION_LABEL = b"edgefl-secagg-v1 share encryption"
MASK_LABEL = b"edgefl-secagg-v1 pairwise mask"
GRAPH_LABEL = b"edgefl-secagg-v1 neighbour graph"
_ZERO_NONCE = bytes(16)
"""ChaCha20's 16-byte nonce (counter and nonce): zero, since every seed is used once."""

B64Key = Annotated[str, StringConstraints(min_length=44, max_length=44,
                                          pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""32 bytes, base64."""
B64Signature = Annotated[str, StringConstraints(min_length=88, max_length=88,
                                                pattern=r"^[A-Za-z0-9+/]{86}==$")]
"""64 bytes (an Ed25519 signature), base64."""
B64Blob = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
"""An encrypted pair of shares or one share, base64."""


class SecAggError(ValueError):
    """A stage that cannot go on: a reason (one word) and a detail for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- messages ----------------------------------------------------------------------------


class DeviceIdentity(WireModel):
    """A device's long-term Ed25519 identity key, certified at provisioning.

    Issued by ``edgefl broker add-device`` with the fleet's identity authority key (kept
    with the broker's secrets, never by the cloud service); devices verify it with the
    authority's public key they were provisioned with.
    """

    device_id: Id
    public_key: B64Key = Field(description="Ed25519 public key (32 bytes, base64)")
    issued_at: UnixTime
    authority: Id = Field(description="Id of the authority key that signed it")
    signature: B64Signature = Field(
        description="The authority's Ed25519 signature over identity_signing_bytes (RFC 8785 "
        "JSON of this message without the signature)")


class SecAggAdvertise(WireModel):
    """Stage 1, device to cloud: the device's two public keys for the round, signed."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    device_id: Id
    c_public: B64Key = Field(description="X25519 key that encrypts the shares sent to it")
    s_public: B64Key = Field(description="X25519 key its pairwise masks are agreed with")
    identity: DeviceIdentity = Field(description="The certificate of the key that signs")
    signature: B64Signature = Field(
        description="Ed25519 signature by the device's identity key over "
        "advertise_signing_bytes (RFC 8785 JSON of this message without the signature)")


class SecAggRoster(WireModel):
    """Stage 1, cloud to devices: ``U1``, the devices that advertised (sorted by id).

    ``threshold``, ``neighbours`` and ``neighbour_threshold`` are the round plan's
    (:class:`schemas.fl.SecAggSpec`); :func:`neighbour_graph` says who masks with whom.
    """

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    threshold: Annotated[int, Field(ge=2, le=MAX_SELECTED)]
    neighbours: NeighbourCount | None = None
    neighbour_threshold: NeighbourThreshold | None = None
    devices: list[SecAggAdvertise] = Field(max_length=MAX_SELECTED)

    @model_validator(mode="after")
    def _graph(self) -> Self:
        check_graph_parameters(self.neighbours, self.neighbour_threshold)
        return self


class SecAggShares(WireModel):
    """Stage 2, device to cloud: for each other device of ``U1``, its encrypted shares."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    device_id: Id
    ciphertexts: dict[Id, B64Blob] = Field(max_length=MAX_SELECTED)


class SecAggInbox(WireModel):
    """Stage 2, cloud to one device: the shares ``U2``'s members encrypted for it."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    recipient: Id
    ciphertexts: dict[Id, B64Blob] = Field(max_length=MAX_SELECTED)


class SecAggSurvivors(WireModel):
    """Stage 4, cloud to devices: ``U3``, the devices whose masked input arrived."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    devices: list[Id] = Field(max_length=MAX_SELECTED)


class SecAggMaskedEnvelope(WireModel):
    """Stage 3, device to cloud: the envelope of a masked input.

    The payload is safetensors with one uint32 tensor named ``masked``.
    """

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    device_id: Id
    base_version: Version = Field(description="The global version the update was trained from")
    sent_at: UnixTime


class SecAggUnmask(WireModel):
    """Stage 4, device to cloud: shares of the survivors' seeds and the dropped' keys."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt
    nonce: RoundNonce
    device_id: Id
    seed_shares: dict[Id, B64Blob] = Field(
        max_length=MAX_SELECTED, description="Its share of b_v for each v of U3")
    key_shares: dict[Id, B64Blob] = Field(
        max_length=MAX_SELECTED, description="Its share of v's s key for each v of U2 not in U3")


# -- the derivations (the wire contract) --------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise SecAggError("bad_encoding", f"{what} is not base64") from exc


def _field(value: str | int) -> bytes:
    data = str(value).encode()
    return len(data).to_bytes(2, "big") + data


_RoundMessage = (SecAggAdvertise | SecAggRoster | SecAggShares | SecAggInbox | SecAggSurvivors
                 | SecAggMaskedEnvelope | SecAggUnmask)


def _session(message: _RoundMessage) -> tuple[str, int, int, str]:
    """Task, round, attempt and nonce of a message: which opening of a round it belongs to."""
    return (message.task, message.round, message.attempt, message.nonce)


def round_context(task: str, round_: int, attempt: int, nonce: str) -> bytes:
    """What every key, mask and share of one round is bound to (length-prefixed fields).

    ``nonce`` is the round plan's (32 hex digits): an opening of the round with the same
    task, round and attempt (a task restarted from scratch) has another context.
    """
    return PROTOCOL + _field(task) + _field(round_) + _field(attempt) + _field(nonce)


def advertise_signing_bytes(message: SecAggAdvertise) -> bytes:
    """The bytes the advertisement's signature covers: RFC 8785 JSON without it."""
    return rfc8785.dumps(message.model_dump(mode="json", exclude={"signature"}))


def identity_signing_bytes(identity: DeviceIdentity) -> bytes:
    """The bytes the authority signs: RFC 8785 JSON of the certificate without signature."""
    return rfc8785.dumps(identity.model_dump(mode="json", exclude={"signature"}))


def issue_identity(authority: Ed25519PrivateKey, authority_id: str, device_id: str,
                   public_key: Ed25519PublicKey, issued_at: float) -> DeviceIdentity:
    """Certify ``public_key`` as ``device_id``'s identity (provisioning)."""
    unsigned = DeviceIdentity(device_id=device_id, public_key=_b64(public_key.public_bytes_raw()),
                              issued_at=issued_at, authority=authority_id,
                              signature=_b64(bytes(64)))
    signature = authority.sign(identity_signing_bytes(unsigned))
    return unsigned.model_copy(update={"signature": _b64(signature)})


def verify_identity(identity: DeviceIdentity, authority: Ed25519PublicKey) -> Ed25519PublicKey:
    """The identity key ``identity`` certifies, once the authority's signature verifies.

    Raises:
        SecAggError: ``bad_identity`` when it does not.
    """
    try:
        authority.verify(_unb64(identity.signature, "signature"),
                         identity_signing_bytes(identity))
        return Ed25519PublicKey.from_public_bytes(_unb64(identity.public_key, "key"))
    except (InvalidSignature, ValueError) as exc:
        raise SecAggError("bad_identity", f"{identity.device_id}'s identity is not certified "
                          "by the fleet's identity authority") from exc


@functools.lru_cache(maxsize=16_384)
def _certified_raw(authority: bytes, identity: DeviceIdentity) -> bytes:
    return verify_identity(identity, Ed25519PublicKey.from_public_bytes(authority)) \
        .public_bytes_raw()


def _certified_key(identity: DeviceIdentity, authority: Ed25519PublicKey) -> Ed25519PublicKey:
    """:func:`verify_identity`, remembered per certificate and authority.

    A certificate lasts as long as the device's provisioning, and every round's roster
    carries every member's again: each is checked once per process (a refused one every
    time, since only results are remembered).
    """
    raw = _certified_raw(authority.public_bytes_raw(), identity)
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True, slots=True)
class Graph:
    """Who masks with whom in a round, and how many shares rebuild one device's secret."""

    neighbours: dict[str, frozenset[str]]
    """Each member of ``U1`` -> its peers (itself excluded; the relation is symmetric)."""
    threshold: int
    """Shares (held by the device and its neighbours) that rebuild its seed or key."""
    degree: int | None = None
    """SecAgg+'s ``k`` when the graph is sparse; None: the complete graph."""
    order: tuple[str, ...] = ()
    """The devices in the graph's order (a device's neighbours sit next to it)."""

    def splits_without(self, members: int, survivors: int) -> bool:
        """Whether losing ``members - survivors`` devices could split the graph.

        ``H(k, n)`` stays connected after any ``k - 1`` removals, and may not after ``k``:
        pairwise masks would then cancel within each part, and the cloud would learn each
        part's sum instead of only the survivors' total.
        """
        return self.degree is not None and members - survivors >= self.degree


def neighbour_graph(roster: SecAggRoster) -> Graph:
    """The round's masking graph: complete (Bonawitz et al.), or SecAgg+'s sparse one.

    Without ``neighbours``, or with ``n - 1 <= neighbours`` for the ``n`` devices of the
    roster, every device is every other's neighbour and a secret needs ``threshold``
    shares. Otherwise it is the Harary graph ``H(k, n)`` of Bell et al. (2020) over a
    pseudo-random order of the devices: each device is joined to the ``k / 2`` devices
    before and after it in the order (cyclically), and a secret needs
    ``neighbour_threshold`` of the ``k + 1`` shares. The order sorts the devices by
    ``SHA-256(g || UTF-8 id)``, where ``g`` is ``SHA-256`` of :data:`GRAPH_LABEL`, the
    round context and, for each roster entry in order, its length-prefixed id, ``c`` key
    and ``s`` key (base64 as sent): it follows from keys the devices drew and the cloud
    only relays. ``H(k, n)`` stays connected after removing any ``k - 1`` devices, so
    while fewer than ``k`` of the roster drop out the masks join every survivor and the
    cloud learns only the survivors' sum.
    """
    ids = [a.device_id for a in roster.devices]
    k = roster.neighbours
    if k is None or roster.neighbour_threshold is None or k >= len(ids) - 1:
        everyone = frozenset(ids)
        return Graph({d: everyone - {d} for d in ids}, roster.threshold)
    digest = hashlib.sha256(GRAPH_LABEL + round_context(*_session(roster)))
    for advert in roster.devices:
        digest.update(_field(advert.device_id) + _field(advert.c_public)
                      + _field(advert.s_public))
    graph_seed = digest.digest()
    order = sorted(ids, key=lambda d: hashlib.sha256(graph_seed + d.encode()).digest())
    place = {d: i for i, d in enumerate(order)}
    n, half = len(order), k // 2
    return Graph({d: frozenset(order[(place[d] + j) % n] for j in range(-half, half + 1)
                               if j != 0) for d in ids}, roster.neighbour_threshold,
                 degree=k, order=tuple(order))


def share_aad(context: bytes, sender: str, recipient: str) -> bytes:
    """Associated data of one encrypted pair of shares: it cannot be moved to another pair."""
    return context + _field(sender) + _field(recipient)


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes, label: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 secret (salt: the round).

    Raises:
        SecAggError: the peer's key is not a valid X25519 public key.
    """
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError("bad_key", f"key agreement failed: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=context,
                info=label).derive(secret)


def expand(seed: bytes, count: int) -> np.ndarray:
    """``count`` pseudo-random uint32 (little-endian) from a 32-byte seed.

    The PRG both sides run for masks: ChaCha20's keystream. The array is a read-only
    view of the keystream (no copy): add it to another, do not write to it.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError("bad_seed", f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(_zeros(4 * count))
    return np.frombuffer(stream, dtype="<u4")


@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    """The keystream's plaintext, made once per size.

    A fresh 400 kB of zeros per mask (a new mapping, page faults) cost twice the cipher
    itself in a loop of masks (218 against 74 us).
    """
    return bytes(size)


def pairwise_sign(me: str, other: str) -> int:
    """+1 when ``me`` sorts before ``other`` (UTF-8 bytes), -1 after: the masks cancel."""
    return 1 if me.encode() < other.encode() else -1


def levels(bits: int) -> int:
    """The largest quantized value: ``2^bits - 1``."""
    return (1 << bits) - 1


def max_devices(bits: int) -> int:
    """How many quantized inputs sum without wrapping modulo 2^32."""
    return (1 << MODULUS_BITS) // (levels(bits) + 1)


def quantize(values: np.ndarray, clip_range: float, bits: int,
             rng: np.random.Generator) -> np.ndarray:
    """Clip to ``[-clip_range, clip_range]``, map to ``0..2^bits-1`` (uint32).

    Rounding is stochastic, so the dequantized sum is unbiased.
    """
    clipped = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range)
    scaled = (clipped + clip_range) / (2.0 * clip_range) * levels(bits)
    floor = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - floor)
    out: np.ndarray = np.minimum(floor + up, levels(bits)).astype(np.uint32)
    return out


def dequantize_sum(total: np.ndarray, count: int, clip_range: float, bits: int) -> np.ndarray:
    """The float sum of ``count`` inputs from the sum of their quantized values."""
    out: np.ndarray = (np.asarray(total, dtype=np.float64) * (2.0 * clip_range / levels(bits))
                       - count * clip_range)
    return out


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every tensor flattened, in sorted name order, as one float64 vector."""
    if not weights:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(weights[name], dtype=np.float64).ravel()
                           for name in sorted(weights)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten` for tensors of ``shapes`` (float32)."""
    out, start = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64))
        out[name] = vector[start:start + size].reshape(shapes[name]).astype(np.float32)
        start += size
    if start != vector.size:
        raise SecAggError("bad_input", f"{vector.size} values for tensors of {start}")
    return out


# -- the device ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """A device of the roster ``U1``: its place (Shamir x) and public keys."""

    device_id: str
    x: int
    c_public: bytes
    s_public: bytes


def _roster_peers(roster: SecAggRoster, authority: Ed25519PublicKey, me: str,
                  ) -> tuple[dict[str, Peer], Graph]:
    """``me`` and its neighbours in the roster after every check, and the round's graph.

    The roster is sorted, unique and of this round; each neighbour's keys are signed by
    an identity key the authority certified for it (the others' keys only place the
    devices in the graph: their own neighbours check them).
    """
    ids = [a.device_id for a in roster.devices]
    if ids != sorted(ids, key=str.encode) or len(set(ids)) != len(ids):
        raise SecAggError("bad_roster", "the roster is not sorted by device id without repeats")
    if len(ids) < roster.threshold:
        raise SecAggError("too_few", f"{len(ids)} device(s) advertised, threshold "
                          f"{roster.threshold}")
    if me not in ids:
        raise SecAggError("bad_roster", "the roster leaves this device out")
    if any(_session(advert) != _session(roster) for advert in roster.devices):
        raise SecAggError("bad_roster", "the roster holds keys for another round")
    graph = neighbour_graph(roster)
    mine = graph.neighbours[me] | {me}
    peers = {}
    for x, advert in enumerate(roster.devices, start=1):
        if advert.device_id not in mine:
            continue
        if advert.device_id == me:
            peers[me] = Peer(me, x, _unb64(advert.c_public, "key"),
                             _unb64(advert.s_public, "key"))
            continue
        if advert.identity.device_id != advert.device_id:
            raise SecAggError("bad_identity", f"{advert.device_id} signed with the identity "
                              f"of {advert.identity.device_id}")
        identity = _certified_key(advert.identity, authority)
        try:
            identity.verify(_unb64(advert.signature, "signature"),
                            advertise_signing_bytes(advert))
        except InvalidSignature as exc:
            raise SecAggError("bad_signature", f"{advert.device_id}'s keys are not signed by "
                              "its identity key") from exc
        peers[advert.device_id] = Peer(advert.device_id, x, _unb64(advert.c_public, "key"),
                                       _unb64(advert.s_public, "key"))
    return peers, graph


@dataclass(slots=True)
class SecAggDevice:
    """One device's side of one round. Each stage runs once, in order."""

    task: str
    round: int
    attempt: int
    device_id: str
    identity: Ed25519PrivateKey
    certificate: DeviceIdentity
    nonce: str = field(kw_only=True)
    """The round plan's nonce (:func:`round_context`)."""
    spec: SecAggSpec | None = field(default=None, kw_only=True)
    """The round plan's parameters: the roster must carry the same threshold and graph
    (a relay that lowered the one or thinned the other would learn more). An agent always
    gives it; None skips the check (the protocol's own tests build rosters directly)."""
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED_BYTES))
    peers: dict[str, Peer] = field(default_factory=dict)
    """This device and its neighbours in ``U1``."""
    members: frozenset[str] = frozenset()
    """``U1``."""
    minimum: int = 0
    """Devices needed at every stage (the roster's threshold)."""
    graph: Graph | None = None
    """The round's masking graph (from the roster)."""
    threshold: int = 0
    """Shares that rebuild one of its secrets (:attr:`Graph.threshold`)."""
    held: dict[str, tuple[shamir.Share, shamir.Share]] = field(default_factory=dict)
    """Shares others gave it: sender -> (share of the sender's s key, of its seed)."""
    masked_with: frozenset[str] = frozenset()
    """``U2``: the devices whose pairwise masks are in its input."""
    stage: str = "new"
    pair_keys: dict[str, bytes] = field(default_factory=dict)
    """Peer -> the AES-GCM key agreed with its ``c`` key: sealed its shares, opens theirs."""

    @property
    def session(self) -> tuple[str, int, int, str]:
        """Task, round, attempt and nonce: what every message of its round names."""
        return (self.task, self.round, self.attempt, self.nonce)

    @property
    def context(self) -> bytes:
        """The round's context bytes."""
        return round_context(self.task, self.round, self.attempt, self.nonce)

    def _advance(self, expected: str, then: str) -> None:
        if self.stage != expected:
            raise SecAggError("out_of_order", f"stage {then} after {self.stage}")
        self.stage = then

    def advertise(self) -> SecAggAdvertise:
        """Stage 1: the two public keys, signed by the identity key."""
        self._advance("new", "advertised")
        raw = {"task": self.task, "round": self.round, "attempt": self.attempt,
               "nonce": self.nonce,
               "device_id": self.device_id,
               "c_public": _b64(self.c_key.public_key().public_bytes_raw()),
               "s_public": _b64(self.s_key.public_key().public_bytes_raw()),
               "identity": self.certificate, "signature": _b64(bytes(64))}
        unsigned = SecAggAdvertise.model_validate(raw)
        signature = self.identity.sign(advertise_signing_bytes(unsigned))
        return unsigned.model_copy(update={"signature": _b64(signature)})

    def share_keys(self, roster: SecAggRoster, authority: Ed25519PublicKey) -> SecAggShares:
        """Stage 2: check ``U1`` and send each peer its shares of the seed and ``s`` key.

        Raises:
            SecAggError: the roster is for another round, leaves this device out or
                changes its keys, has fewer than ``threshold`` devices, or a device whose
                identity the authority did not certify or whose signature does not verify.
        """
        self._advance("advertised", "shared")
        if _session(roster) != self.session:
            raise SecAggError("bad_roster", "the roster is for another round")
        spec = self.spec
        if spec is not None and (roster.threshold, roster.neighbours,
                                 roster.neighbour_threshold) != (
                spec.threshold, spec.neighbours, spec.neighbour_threshold):
            raise SecAggError("bad_roster", "the roster's threshold or neighbour graph is "
                              "not the round plan's")
        peers, graph = _roster_peers(roster, authority, self.device_id)
        me = peers[self.device_id]
        if me.c_public != self.c_key.public_key().public_bytes_raw() \
                or me.s_public != self.s_key.public_key().public_bytes_raw():
            raise SecAggError("bad_roster", "the roster changes this device's keys")
        self.peers, self.threshold, self.graph = peers, graph.threshold, graph
        self.members = frozenset(a.device_id for a in roster.devices)
        self.minimum = roster.threshold
        holders = list(peers.values())
        xs = [peer.x for peer in holders]
        try:
            key_shares = shamir.split_at(self.s_key.private_bytes_raw(), graph.threshold, xs)
            seed_shares = shamir.split_at(self.seed, graph.threshold, xs)
        except shamir.ShamirError as exc:
            raise SecAggError("bad_roster", f"cannot share among {len(xs)} holder(s) with "
                              f"threshold {graph.threshold}: {exc}") from exc
        context = self.context
        ciphertexts = {}
        nonces = secrets.token_bytes(NONCE_BYTES * len(holders))  # one read, not one per peer
        for i, peer in enumerate(holders):
            plain = key_shares[i].to_bytes() + seed_shares[i].to_bytes()
            if peer.device_id == self.device_id:  # its own shares it keeps
                self.held[self.device_id] = (key_shares[i], seed_shares[i])
                continue
            key = agree(self.c_key, peer.c_public, context, ENCRYPTION_LABEL)
            self.pair_keys[peer.device_id] = key
            nonce = nonces[NONCE_BYTES * i:NONCE_BYTES * (i + 1)]
            sealed = AESGCM(key).encrypt(nonce, plain, share_aad(context, self.device_id,
                                                                  peer.device_id))
            ciphertexts[peer.device_id] = _b64(nonce + sealed)
        return SecAggShares(task=self.task, round=self.round, attempt=self.attempt,
                            nonce=self.nonce, device_id=self.device_id,
                            ciphertexts=ciphertexts)

    def masked_input(self, inbox: SecAggInbox, quantized: np.ndarray) -> np.ndarray:
        """Stage 3: its quantized update plus its self mask and pairwise masks (mod 2^32).

        ``U2`` is this device and the senders in its inbox.

        Raises:
            SecAggError: the inbox is for another device or round, names a device outside
                ``U1``, has fewer than ``threshold - 1`` senders, or holds a ciphertext that
                does not decrypt (tampered, or moved from another pair).
        """
        self._advance("shared", "masked")
        if (*_session(inbox), inbox.recipient) != (*self.session, self.device_id):
            raise SecAggError("bad_inbox", "the inbox is for another device or round")
        senders = set(inbox.ciphertexts)
        if not senders <= set(self.peers) - {self.device_id}:
            raise SecAggError("bad_inbox", "shares from devices that are not its neighbours "
                              "in the roster")
        if len(senders) + 1 < self.threshold:
            raise SecAggError("too_few", f"{len(senders) + 1} device(s) shared keys, "
                              f"threshold {self.threshold}")
        context = self.context
        for sender in sorted(senders):
            blob = _unb64(inbox.ciphertexts[sender], "ciphertext")
            key = self.pair_keys.get(sender)  # every roster peer's, from share_keys
            if key is None:
                raise SecAggError("out_of_order", f"no key agreed with {sender}")
            try:
                plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                            share_aad(context, sender, self.device_id))
            except (InvalidTag, ValueError) as exc:
                raise SecAggError("bad_ciphertext", f"the shares from {sender} do not "
                                  "decrypt") from exc
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggError("bad_ciphertext", f"the shares from {sender} are malformed")
            try:
                key_share = shamir.Share.from_bytes(plain[:shamir.SHARE_BYTES])
                seed_share = shamir.Share.from_bytes(plain[shamir.SHARE_BYTES:])
            except shamir.ShamirError as exc:
                raise SecAggError("bad_ciphertext", f"the shares from {sender}: {exc}") from exc
            if key_share.x != self.peers[self.device_id].x or seed_share.x != key_share.x:
                raise SecAggError("bad_ciphertext", f"the shares from {sender} are for "
                                  "another place")
            self.held[sender] = (key_share, seed_share)
        self.masked_with = frozenset(senders | {self.device_id})
        values = np.asarray(quantized, dtype=np.uint32).ravel()
        masked: np.ndarray = values + expand(self.seed, values.size)
        for other in sorted(senders):
            seed = agree(self.s_key, self.peers[other].s_public, context, MASK_LABEL)
            mask = expand(seed, values.size)
            if pairwise_sign(self.device_id, other) > 0:
                masked += mask
            else:
                masked -= mask
        return masked

    def unmask(self, survivors: SecAggSurvivors) -> SecAggUnmask:
        """Stage 4: shares of each survivor's seed and of each dropped device's ``s`` key.

        Raises:
            SecAggError: ``U3`` is for another round, is not within ``U2``, leaves this
                device out, or has fewer than ``threshold`` devices.
        """
        self._advance("masked", "unmasked")
        u3 = set(survivors.devices)
        if _session(survivors) != self.session:
            raise SecAggError("bad_survivors", "the survivors are for another round")
        if len(u3) != len(survivors.devices) or not u3 <= self.members \
                or not u3 & set(self.peers) <= self.masked_with or self.device_id not in u3:
            raise SecAggError("bad_survivors", "the survivors name neighbours this one did "
                              "not mask with, devices outside the roster, or leave it out")
        if len(u3) < self.minimum:
            raise SecAggError("too_few", f"{len(u3)} survivor(s), threshold {self.minimum}")
        if self.graph is not None and self.graph.splits_without(len(self.members), len(u3)):
            raise SecAggError("too_few", f"{len(self.members) - len(u3)} of {len(self.members)} "
                              f"devices dropped out, as many as the graph's degree "
                              f"{self.graph.degree}: the survivors' masks may not join them "
                              "all, and parts of the sum could open")
        seeds = {v: _b64(self.held[v][1].to_bytes()) for v in sorted(u3 & self.masked_with)}
        keys = {v: _b64(self.held[v][0].to_bytes()) for v in sorted(self.masked_with - u3)}
        return SecAggUnmask(task=self.task, round=self.round, attempt=self.attempt,
                            nonce=self.nonce, device_id=self.device_id, seed_shares=seeds,
                            key_shares=keys)


# -- the server ---------------------------------------------------------------------------


@dataclass(slots=True)
class SecAggServer:
    """The cloud's side of one round: collect, relay, sum, unmask. It sees no input."""

    task: str
    round: int
    attempt: int
    threshold: int
    size: int
    """Elements of a masked input."""
    nonce: str = field(kw_only=True)
    """The round plan's nonce (:func:`round_context`)."""
    neighbours: int | None = field(default=None, kw_only=True)
    """SecAgg+: each device's peers in the graph (:func:`neighbour_graph`); None: all."""
    neighbour_threshold: int | None = field(default=None, kw_only=True)
    """SecAgg+: shares that rebuild a device's secret."""
    adverts: dict[str, SecAggAdvertise] = field(default_factory=dict)
    roster: SecAggRoster | None = None
    graph: Graph | None = None
    shares: dict[str, SecAggShares] = field(default_factory=dict)
    u2: frozenset[str] = frozenset()
    total: np.ndarray | None = None
    u3: list[str] = field(default_factory=list)
    unmasks: dict[str, SecAggUnmask] = field(default_factory=dict)

    def _check(self, message: _RoundMessage) -> None:
        if _session(message) != (self.task, self.round, self.attempt, self.nonce):
            raise SecAggError("wrong_round", "a message for another round (or another "
                              "opening of it)")

    def add_advert(self, advert: SecAggAdvertise) -> None:
        """Stage 1 input (signatures are the devices' to check: they hold the identities)."""
        self._check(advert)
        if self.roster is not None:
            raise SecAggError("late", "the roster is out")
        self.adverts[advert.device_id] = advert

    def close_adverts(self) -> SecAggRoster:
        """``U1``; raises SecAggError (``too_few``) below the threshold."""
        if len(self.adverts) < self.threshold:
            raise SecAggError("too_few", f"{len(self.adverts)} device(s) advertised keys, "
                              f"threshold {self.threshold}")
        ordered = [self.adverts[d] for d in sorted(self.adverts, key=str.encode)]
        self.roster = SecAggRoster(task=self.task, round=self.round, attempt=self.attempt,
                                   nonce=self.nonce, threshold=self.threshold,
                                   neighbours=self.neighbours,
                                   neighbour_threshold=self.neighbour_threshold,
                                   devices=ordered)
        self.graph = neighbour_graph(self.roster)
        return self.roster

    def add_shares(self, shares: SecAggShares) -> None:
        """Stage 2 input: one ciphertext for each of the device's neighbours in ``U1``."""
        self._check(shares)
        if self.graph is None or self.u2:
            raise SecAggError("out_of_order", "shares outside the sharing stage")
        neighbours = self.graph.neighbours.get(shares.device_id)
        if neighbours is None:
            raise SecAggError("not_in_roster", f"{shares.device_id} did not advertise keys")
        if set(shares.ciphertexts) != neighbours:
            raise SecAggError("bad_shares", "shares must go to every neighbour of the device "
                              "in the roster, and only to them")
        self.shares[shares.device_id] = shares

    def close_shares(self) -> dict[str, SecAggInbox]:
        """``U2`` and each member's inbox; raises SecAggError below the threshold."""
        if len(self.shares) < self.threshold:
            raise SecAggError("too_few", f"{len(self.shares)} device(s) shared keys, "
                              f"threshold {self.threshold}")
        self.u2 = frozenset(self.shares)
        return {recipient: SecAggInbox(
            task=self.task, round=self.round, attempt=self.attempt, nonce=self.nonce,
            recipient=recipient,
            ciphertexts={s: self.shares[s].ciphertexts[recipient]
                         for s in sorted(self.u2) if recipient in self.shares[s].ciphertexts})
            for recipient in sorted(self.u2)}

    def add_masked(self, device_id: str, masked: np.ndarray) -> None:
        """Stage 3 input, folded into the running sum at once (inputs are not kept)."""
        if device_id not in self.u2 or device_id in self.u3:
            raise SecAggError("not_expected", f"no masked input expected from {device_id}")
        values = np.asarray(masked)
        if values.dtype != np.uint32 or values.size != self.size:
            raise SecAggError("bad_input", f"a masked input is {self.size} uint32, got "
                              f"{values.size} {values.dtype}")
        self.total = values.ravel().copy() if self.total is None else self.total + values.ravel()
        self.u3.append(device_id)

    def close_masked(self) -> SecAggSurvivors:
        """``U3``; raises SecAggError below the threshold."""
        if len(self.u3) < self.threshold:
            raise SecAggError("too_few", f"{len(self.u3)} masked input(s), threshold "
                              f"{self.threshold}")
        if self.graph is not None and self.roster is not None and \
                self.graph.splits_without(len(self.roster.devices), len(self.u3)):
            raise SecAggError("too_few", f"{len(self.u3)} masked input(s) of "
                              f"{len(self.roster.devices)}: as many dropped out as the graph's "
                              f"degree {self.graph.degree}, so it may be split")
        self.u3.sort(key=str.encode)
        return SecAggSurvivors(task=self.task, round=self.round, attempt=self.attempt,
                               nonce=self.nonce, devices=list(self.u3))

    def add_unmask(self, unmask: SecAggUnmask) -> None:
        """Stage 4 input from a survivor: exactly the shares the survivors' list asks for."""
        self._check(unmask)
        if unmask.device_id not in self.u3 or self.graph is None:
            raise SecAggError("not_expected", f"{unmask.device_id} is not a survivor")
        neighbours = self.graph.neighbours[unmask.device_id]
        if set(unmask.seed_shares) != set(self.u3) & (neighbours | {unmask.device_id}) or \
                set(unmask.key_shares) != (self.u2 - set(self.u3)) & neighbours:
            raise SecAggError("bad_unmask", "shares for the wrong devices")
        self.unmasks[unmask.device_id] = unmask

    def finish(self) -> np.ndarray:
        """The exact sum of the survivors' quantized updates (uint32, mod 2^32).

        Raises:
            SecAggError: fewer than ``threshold`` answers, or shares that do not rebuild
                a dropped device's key (its public key does not match) or that disagree.
        """
        if len(self.unmasks) < self.threshold or self.total is None or self.roster is None \
                or self.graph is None:
            raise SecAggError("too_few", f"{len(self.unmasks)} unmasking answer(s), threshold "
                              f"{self.threshold}")
        context = round_context(self.task, self.round, self.attempt, self.nonce)
        adverts = {a.device_id: a for a in self.roster.devices}
        total = self.total.copy()
        graph = self.graph
        rebuild = _Rebuilder(graph.threshold)
        for v in self.u3:
            seed = rebuild([u.seed_shares[v] for u in self.unmasks.values()
                            if v in u.seed_shares], SEED_BYTES, f"{v}'s seed")
            total -= expand(seed, self.size)
        for v in sorted(self.u2 - set(self.u3)):
            raw = rebuild([u.key_shares[v] for u in self.unmasks.values()
                           if v in u.key_shares], KEY_BYTES, f"{v}'s key")
            s_key = X25519PrivateKey.from_private_bytes(raw)
            if s_key.public_key().public_bytes_raw() != _unb64(adverts[v].s_public, "key"):
                raise SecAggError("bad_shares", f"the shares of {v}'s key do not rebuild it")
            for u in sorted(set(self.u3) & graph.neighbours[v]):  # u added +mask if u < v
                mask = expand(agree(s_key, _unb64(adverts[u].s_public, "key"), context,
                                    MASK_LABEL), self.size)
                if pairwise_sign(u, v) > 0:
                    total -= mask
                else:
                    total += mask
        return total


class _Rebuilder:
    """Rebuilds secrets from the unmasking answers, checking every share past the threshold.

    Over the complete graph every secret is shared among the same holders, so the
    Lagrange weights are computed once per set of points (the cost is then linear per
    secret); with SecAgg+ each neighbourhood has its own set.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._weights: dict[tuple[int, ...], tuple[list[int], list[list[int]]]] = {}

    def __call__(self, encoded: Sequence[str], length: int, what: str) -> bytes:
        if len(encoded) < self.threshold:
            raise SecAggError("too_few", f"{what}: {len(encoded)} share(s) answered, "
                              f"{self.threshold} needed")
        try:
            shares = [shamir.Share.from_bytes(_unb64(s, "share")) for s in encoded]
            xs = tuple(s.x for s in shares)
            if len(set(xs)) != len(xs):
                raise SecAggError("bad_shares", f"{what}: two answers give the same share")
            if xs not in self._weights:
                base = list(xs[:self.threshold])
                self._weights[xs] = (shamir.weights(base, 0),
                                     [shamir.weights(base, x) for x in xs[self.threshold:]])
            at_zero, at_extra = self._weights[xs]
            secret = shamir.combine(shares[:self.threshold], length, at_zero)
            if not shamir.consistent(shares, self.threshold, at_extra):
                raise SecAggError("bad_shares", f"{what}: the shares disagree")
        except shamir.ShamirError as exc:
            raise SecAggError("bad_shares", f"{what}: {exc}") from exc
        return secret
