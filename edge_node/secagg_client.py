"""The device side of secure aggregation (:mod:`schemas.secagg`) over MQTT.

For a round plan that asks for it, the device advertises two fresh key pairs signed
with its identity key (``secagg/advertise/{d}``), answers the roster of keys with its
encrypted shares (``secagg/shares/{d}``), takes the shares its inbox relays
(``secagg/shares/to/{d}``, which only it may read), sends its trained update quantized
and masked (``secagg/masked/{d}``) and, given the survivors, the shares that let the
cloud remove the masks (``secagg/unmask/{d}``). The cloud never receives the update
itself. One thread owns every round's state; the training thread hands it the update,
the network thread the stage messages, so a long training never delays a key stage.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.counters import Counters
from edge_node.errors import EdgeError
from edge_node.job_thread import JobThread
from edge_node.settings import SecAggSettings
from fl_tasks.base import Weights
from schemas.base import decode_message, now
from schemas.codec import encode
from schemas.errors import DecodeError
from schemas.fl import RoundPlan
from schemas.secagg import (
    ADVERTISE,
    MASKED,
    MASKED_TENSOR,
    ROSTER,
    SHARES,
    SURVIVORS,
    UNMASK,
    DeviceIdentity,
    SecAggDevice,
    SecAggError,
    SecAggInbox,
    SecAggMaskedEnvelope,
    SecAggRoster,
    SecAggSurvivors,
    flatten,
    quantize,
)
from schemas.topics import TopicKind, Topics

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]
T = TypeVar("T")
MAX_STAGE_BYTES = 4 * 1024 * 1024
"""A roster, an inbox or a survivors list larger than this is refused unread."""


@dataclass
class _Session:
    """One round's (one attempt's) secure aggregation on this device."""

    plan: RoundPlan
    device: SecAggDevice
    inbox: SecAggInbox | None = None
    quantized: np.ndarray | None = None
    masked: bool = False


class SecAggClient:
    """Secure aggregation for every task of this device."""

    def __init__(self, device_id: str, topics: Topics, settings: SecAggSettings, *,
                 publish: Publish, counters: Counters) -> None:
        key = serialization.load_pem_private_key(settings.identity_key.read_bytes(),
                                                 password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{settings.identity_key} is not an Ed25519 private key")
        self.identity = key
        self.certificate = decode_message(DeviceIdentity, settings.certificate.read_bytes())
        if self.certificate.device_id != device_id:
            raise ValueError(f"{settings.certificate} certifies {self.certificate.device_id}, "
                             f"not {device_id}")
        self.authority = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(settings.authority_key, validate=True))
        self.device_id = device_id
        self.topics = topics
        self._publish = publish
        self.counters = counters
        self.sessions: dict[str, _Session] = {}
        self._jobs = JobThread(f"secagg-{device_id}", "secagg", counters,
                               (SecAggError, DecodeError, EdgeError, ValueError, OSError))

    def filters(self, tasks: list[str]) -> list[str]:
        """The round stages every device reads, and this device's own inbox."""
        out = []
        for task in tasks:
            out.append(self.topics.filter(TopicKind.SECAGG_BROADCAST, task=task))
            out.append(self.topics.filter(TopicKind.SECAGG_INBOX, task=task,
                                          device_id=self.device_id))
        return out

    def start(self) -> None:
        """Start the thread that owns the rounds."""
        self._jobs.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (after its current job)."""
        self._jobs.stop(timeout)

    # -- from the training thread ----------------------------------------------------

    def begin(self, task: str, plan: RoundPlan) -> None:
        """A plan that selects this device: advertise keys for it."""
        self._jobs.put(lambda: self._begin(task, plan))

    def submit_update(self, task: str, plan: RoundPlan, delta: Weights) -> None:
        """The trained update (clipped and noised if the round says so) to mask and send."""
        self._jobs.put(lambda: self._update(task, plan, delta))

    # -- from the network thread -----------------------------------------------------

    def on_message(self, kind: TopicKind, task: str, round_: int, stage: str,
                   payload: bytes) -> None:
        """A roster, inbox or survivors list of a round."""
        self._jobs.put(lambda: self._message(kind, task, round_, stage, payload))

    # -- the owner thread ------------------------------------------------------------

    def _begin(self, task: str, plan: RoundPlan) -> None:
        current = self.sessions.get(task)
        if current is not None and (current.plan.round, current.plan.attempt,
                                    current.plan.nonce) == (plan.round, plan.attempt,
                                                            plan.nonce):
            return  # the same plan again (retained, or a reconnection)
        if plan.nonce is None:
            self.counters.add("secagg_refused_no_nonce")
            logger.warning("%s: round %d of %s: a secure round plan without a nonce (from an "
                           "older cloud?); not taking part", self.device_id, plan.round, task)
            return
        device = SecAggDevice(task, plan.round, plan.attempt, self.device_id, self.identity,
                              self.certificate, nonce=plan.nonce, spec=plan.secagg)
        self.sessions[task] = _Session(plan, device)
        advert = device.advertise()
        self._publish(self.topics.secagg_device(task, plan.round, ADVERTISE, self.device_id),
                      advert.to_json())

    def _session(self, task: str, round_: int, attempt: int | None = None,
                 nonce: str | None = None, *, broadcast: bool = False) -> _Session | None:
        """The session a message belongs to (None, counted: another round or opening).

        A broadcast of a round this device takes no part in is for the round's members
        (every member of the task receives it): ignored, not counted.
        """
        session = self.sessions.get(task)
        if broadcast and (session is None or session.plan.round != round_):
            return None
        if session is None or session.plan.round != round_ or (
                attempt is not None and session.plan.attempt != attempt) or (
                nonce is not None and session.plan.nonce != nonce):
            self.counters.add("secagg_stale")
            return None
        return session

    def _update(self, task: str, plan: RoundPlan, delta: Weights) -> None:
        session = self._session(task, plan.round, plan.attempt)
        spec = plan.secagg
        if session is None or spec is None:
            return
        rng = np.random.default_rng(secrets.randbits(128))  # rounding only, not masks
        session.quantized = quantize(flatten(delta), spec.clip_range,
                                     spec.quantization_bits, rng)
        self._mask(task, session)

    def _message(self, kind: TopicKind, task: str, round_: int, stage: str,
                 payload: bytes) -> None:
        if len(payload) > MAX_STAGE_BYTES:
            self.counters.add("secagg_refused_too_large")
            return
        if kind is TopicKind.SECAGG_INBOX and stage == SHARES:
            inbox = decode_message(SecAggInbox, payload, max_bytes=MAX_STAGE_BYTES)
            session = self._session(task, round_, inbox.attempt, inbox.nonce)
            if session is not None:
                session.inbox = inbox
                self._mask(task, session)
        elif kind is TopicKind.SECAGG_BROADCAST and stage == ROSTER:
            roster = decode_message(SecAggRoster, payload, max_bytes=MAX_STAGE_BYTES)
            session = self._session(task, round_, roster.attempt, roster.nonce,
                                    broadcast=True)
            if session is not None and self.device_id in {a.device_id for a in roster.devices}:
                device = session.device
                shares = self._guarded(task, session, lambda: device.share_keys(
                    roster, self.authority))
                if shares is not None:
                    self._publish(self.topics.secagg_device(task, round_, SHARES,
                                                            self.device_id), shares.to_json())
        elif kind is TopicKind.SECAGG_BROADCAST and stage == SURVIVORS:
            survivors = decode_message(SecAggSurvivors, payload, max_bytes=MAX_STAGE_BYTES)
            session = self._session(task, round_, survivors.attempt, survivors.nonce,
                                    broadcast=True)
            if session is not None and self.device_id in survivors.devices:
                device = session.device
                answer = self._guarded(task, session, lambda: device.unmask(survivors))
                if answer is not None:
                    self._publish(self.topics.secagg_device(task, round_, UNMASK,
                                                            self.device_id), answer.to_json())
                    self.sessions.pop(task, None)
        else:
            self.counters.add("secagg_unexpected_stage")

    def _guarded(self, task: str, session: _Session, step: Callable[[], T]) -> T | None:
        """Run a protocol step; a refusal ends this device's part in the round (counted)."""
        try:
            return step()
        except SecAggError as exc:
            self.counters.add(f"secagg_refused_{exc.reason}")
            logger.warning("%s: round %d of %s: secure aggregation stopped here: %s",
                           self.device_id, session.plan.round, task, exc)
            self.sessions.pop(task, None)
            return None

    def _mask(self, task: str, session: _Session) -> None:
        """Send the masked input once both the shares and the update are here."""
        if session.masked or session.inbox is None or session.quantized is None:
            return
        quantized = session.quantized
        inbox = session.inbox
        masked = self._guarded(task, session, lambda: session.device.masked_input(
            inbox, quantized))
        if masked is None:
            return
        session.masked = True
        plan = session.plan
        envelope = SecAggMaskedEnvelope(task=task, round=plan.round, attempt=plan.attempt,
                                        nonce=session.device.nonce, device_id=self.device_id,
                                        base_version=plan.global_version, sent_at=now())
        self._publish(self.topics.secagg_device(task, plan.round, MASKED, self.device_id),
                      encode({MASKED_TENSOR: masked}, envelope))
        self.counters.add("secagg_masked_sent")

