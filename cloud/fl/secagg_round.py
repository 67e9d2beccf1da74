"""Secure aggregation of one round on the cloud: stages, their deadlines, relaying, the sum.

The coordinator owns it. It hands over what the round's devices send on
``fl/{t}/rounds/{r}/secagg/{stage}/{d}`` (:meth:`SecAggRound.receive`), asks on every tick
whether the stage is over (:meth:`SecAggRound.due`: every expected device answered, or
the stage's deadline passed) and then publishes what :meth:`SecAggRound.advance` returns:
the roster of keys, each device's inbox of encrypted shares, the list of survivors, and
at the end the mean of the survivors' updates. The protocol and its checks are
:mod:`schemas.secagg`; this module adds time, topics and payload decoding. Nothing of a
single device's update is ever in the clear here: masked inputs are folded into the sum
as they arrive. The state lives in memory: after a restart the round is opened again as
a new attempt (new keys).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from cloud.fl.config import SecAggConfig
from schemas.base import decode_message, now
from schemas.codec import DecodeLimits, decode
from schemas.errors import DecodeError
from schemas.fl import SecAggSpec
from schemas.secagg import (
    ADVERTISE,
    MASKED,
    MASKED_TENSOR,
    ROSTER,
    SHARES,
    SURVIVORS,
    UNMASK,
    SecAggAdvertise,
    SecAggError,
    SecAggMaskedEnvelope,
    SecAggServer,
    SecAggShares,
    SecAggUnmask,
    dequantize_sum,
    unflatten,
)
from schemas.topics import Topics

logger = logging.getLogger(__name__)

JSON_BASE_BYTES = 64 * 1024
JSON_BYTES_PER_DEVICE = 1024
"""A stage's JSON message grows with the round's devices (one ciphertext or share each)."""


def threshold_for(selected: int, share: float) -> int:
    """Devices needed at every stage: ``ceil(share * selected)``, at least 2."""
    return min(selected, max(2, math.ceil(share * selected - 1e-9)))


def spec_for(selected: int, config: SecAggConfig) -> SecAggSpec:
    """A round's parameters for ``selected`` devices.

    With ``neighbours`` (SecAgg+): the threshold allows ``d = selected - needed``
    devices to drop out. ``k`` is at least ``2d`` (and 2), and a secret needs
    ``k + 1 - d`` of its ``k + 1`` holders. So whichever ``d`` devices drop out, the
    graph stays connected (``k > d``) and every secret keeps enough holders (the round
    never fails where the complete graph would not), and a secret needs more than half
    of its holders. A smaller ``neighbours`` is raised to that; ``auto`` is that. A graph
    with ``k >= selected - 1`` is the complete one, sent without neighbours.
    """
    needed = threshold_for(selected, config.threshold)
    spec = SecAggSpec(threshold=needed, quantization_bits=config.quantization_bits,
                      clip_range=config.clip_range)
    if config.neighbours is None:
        return spec
    tolerated = selected - needed
    least = max(2, 2 * tolerated)
    k = max(least, config.neighbours) if isinstance(config.neighbours, int) else least
    if k >= selected - 1:
        return spec
    return spec.model_copy(update={"neighbours": k, "neighbour_threshold": k + 1 - tolerated})


@dataclass(frozen=True, slots=True)
class Publication:
    """A message the coordinator is to publish (QoS 1, not retained)."""

    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SecAggOutcome:
    """The end of the round's aggregation."""

    mean: dict[str, np.ndarray]
    survivors: list[str]


@dataclass
class SecAggRound:
    """One round's (one attempt's) secure aggregation, driven by the coordinator."""

    topics: Topics
    task: str
    round: int
    attempt: int
    nonce: str
    """The round plan's nonce: every message and key of the round is bound to it."""
    base_version: str
    selected: list[str]
    spec: SecAggSpec
    shapes: dict[str, tuple[int, ...]]
    stage_timeout_s: float
    masked_deadline: float
    """The round's deadline: devices train before they send their masked input."""
    stage: str = ADVERTISE
    deadline: float = 0.0
    server: SecAggServer = field(init=False)
    bytes_received: dict[str, int] = field(default_factory=dict)
    """Bytes each device sent over the round's stages."""

    def __post_init__(self) -> None:
        size = sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())
        self.server = SecAggServer(self.task, self.round, self.attempt, self.spec.threshold,
                                   size, nonce=self.nonce, neighbours=self.spec.neighbours,
                                   neighbour_threshold=self.spec.neighbour_threshold)
        self.deadline = now() + self.stage_timeout_s

    # -- who is expected ----------------------------------------------------------------

    def expected(self) -> set[str]:
        """Devices whose message this stage waits for."""
        if self.stage == ADVERTISE:
            return set(self.selected)
        if self.stage == SHARES:
            assert self.server.roster is not None  # noqa: S101 - set by advance
            return {a.device_id for a in self.server.roster.devices}
        if self.stage == MASKED:
            return set(self.server.u2)
        return set(self.server.u3)

    def arrived(self) -> set[str]:
        """Devices whose message of this stage was taken."""
        if self.stage == ADVERTISE:
            return set(self.server.adverts)
        if self.stage == SHARES:
            return set(self.server.shares)
        if self.stage == MASKED:
            return set(self.server.u3)
        return set(self.server.unmasks)

    def due(self, at: float | None = None) -> bool:
        """Whether the stage is over: everyone answered, or its deadline passed."""
        return self.arrived() >= self.expected() or (now() if at is None else at) >= \
            self.deadline

    # -- input -------------------------------------------------------------------------

    def receive(self, stage: str, device_id: str, payload: bytes) -> bool:
        """Take one device's message of the current stage; False: a repeat (counted once).

        Raises:
            SecAggError: a message of another stage, from a device not expected at this
                stage, that does not decode, names another device or round, or that the
                protocol refuses.
        """
        if stage != self.stage or stage not in (ADVERTISE, SHARES, MASKED, UNMASK):
            raise SecAggError("wrong_stage", f"a {stage} message during the {self.stage} stage")
        if device_id not in self.expected():
            raise SecAggError("not_expected", f"{device_id} is not expected at {stage}")
        if device_id in self.arrived():
            return False
        if stage == MASKED:
            self._masked(device_id, payload)
        else:
            limit = JSON_BASE_BYTES + JSON_BYTES_PER_DEVICE * len(self.selected)
            try:
                if stage == ADVERTISE:
                    advert = decode_message(SecAggAdvertise, payload, max_bytes=limit)
                    self._same_device(device_id, advert.device_id)
                    self.server.add_advert(advert)
                elif stage == SHARES:
                    shares = decode_message(SecAggShares, payload, max_bytes=limit)
                    self._same_device(device_id, shares.device_id)
                    self.server.add_shares(shares)
                else:
                    unmask = decode_message(SecAggUnmask, payload, max_bytes=limit)
                    self._same_device(device_id, unmask.device_id)
                    self.server.add_unmask(unmask)
            except DecodeError as exc:
                raise SecAggError(exc.reason, str(exc)) from exc
        self.bytes_received[device_id] = self.bytes_received.get(device_id, 0) + len(payload)
        return True

    @staticmethod
    def _same_device(topic_device: str, claimed: str) -> None:
        if topic_device != claimed:
            raise SecAggError("device_mismatch", f"payload says {claimed!r}, topic says "
                              f"{topic_device!r}")

    def _masked(self, device_id: str, payload: bytes) -> None:
        size = self.server.size
        try:
            decoded = decode(payload, SecAggMaskedEnvelope,
                             DecodeLimits(max_bytes=4 * size + JSON_BASE_BYTES))
        except DecodeError as exc:
            raise SecAggError(exc.reason, str(exc)) from exc
        envelope = decoded.envelope
        self._same_device(device_id, envelope.device_id)
        if (envelope.task, envelope.round, envelope.attempt, envelope.nonce) != (
                self.task, self.round, self.attempt, self.nonce):
            raise SecAggError("wrong_round", "a masked input for another round (or another "
                              "opening of it)")
        if envelope.base_version != self.base_version:
            raise SecAggError("stale_base", f"trained from {envelope.base_version}, round "
                              f"uses {self.base_version}")
        if set(decoded.tensors) != {MASKED_TENSOR}:
            raise SecAggError("bad_input", f"a masked input is one tensor named "
                              f"{MASKED_TENSOR!r}")
        self.server.add_masked(device_id, np.asarray(decoded.tensors[MASKED_TENSOR]))

    # -- stages ------------------------------------------------------------------------

    def advance(self) -> list[Publication] | SecAggOutcome:
        """Close the stage: what to publish for the next one, or the round's mean.

        Raises:
            SecAggError: ``too_few`` devices answered (the round's attempt fails), or the
                unmasking shares do not rebuild the masks (``bad_shares``).
        """
        if self.stage == ADVERTISE:
            roster = self.server.close_adverts()
            self._next(SHARES, now() + self.stage_timeout_s)
            return [Publication(self.topics.secagg_broadcast(self.task, self.round, ROSTER),
                                roster.to_json())]
        if self.stage == SHARES:
            inboxes = self.server.close_shares()
            self._next(MASKED, max(self.masked_deadline, now() + self.stage_timeout_s))
            return [Publication(self.topics.secagg_inbox(self.task, self.round, SHARES, d),
                                inbox.to_json()) for d, inbox in inboxes.items()]
        if self.stage == MASKED:
            survivors = self.server.close_masked()
            self._next(UNMASK, now() + self.stage_timeout_s)
            return [Publication(self.topics.secagg_broadcast(self.task, self.round, SURVIVORS),
                                survivors.to_json())]
        total = self.server.finish()
        count = len(self.server.u3)
        mean = dequantize_sum(total, count, self.spec.clip_range,
                              self.spec.quantization_bits) / count
        self.stage = "done"
        return SecAggOutcome(unflatten(mean, self.shapes), list(self.server.u3))

    def _next(self, stage: str, deadline: float) -> None:
        logger.info("%s: round %d (attempt %d): secure aggregation %s done (%d of %d); %s",
                    self.task, self.round, self.attempt, self.stage, len(self.arrived()),
                    len(self.expected()), stage)
        self.stage = stage
        self.deadline = deadline
