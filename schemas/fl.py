"""Federated-learning messages.

Round plans, evaluation results, task status, and the JSON envelopes carried in
the header of safetensors updates and global weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from schemas.base import (
    INT64_MAX,
    Fraction,
    Id,
    NonNegFloat,
    NonNegInt,
    PosInt,
    RoundNonce,
    RoundNumber,
    ShortText,
    UnixTime,
    Version,
    WireModel,
)

CONTROL_PREFIX = "cv:"
"""Name prefix of SCAFFOLD control-variate tensors in global-weights and update payloads."""
MAX_SELECTED = 10_000
MAX_REJECTION_EXAMPLES = 20
"""Refused updates kept as examples per round; every refusal is counted by reason."""
FiniteLoss = Annotated[float, Field(ge=0.0, description="Mean loss over the examples")]


class Compression(StrEnum):
    """How an update's tensors are encoded on the wire."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    TOPK_INT8 = "topk_int8"


class CompressionSpec(WireModel):
    """Compression asked of the clients in a round."""

    kind: Compression = Compression.NONE
    topk_fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="Share of coordinates kept by top-k, 0-1"
    )

    @model_validator(mode="after")
    def _topk_has_fraction(self) -> Self:
        if self.kind == Compression.TOPK_INT8 and self.topk_fraction is None:
            raise ValueError("topk_int8 needs topk_fraction")
        return self


class PrivacySpec(WireModel):
    """Differential privacy of the round: what each selected device does to its update.

    The device clips its whole update (every tensor together) to ``clip_norm`` in L2,
    then adds Gaussian noise of standard deviation ``noise_stddev`` to every
    coordinate, drawn from a generator seeded by the operating system. With
    ``clip_count_stddev`` set (adaptive clipping), it also reports whether its update
    was within the bound, as ``clip_bit`` (1 or 0) plus Gaussian noise of that
    standard deviation.
    """

    mode: Literal["client", "central", "distributed"] = Field(
        default="client", description="Where the noise is added: `client` (each device, "
        "all of it), `central` (the server, after summing), `distributed` (each device "
        "a share, the sum carries all of it)")
    clip_norm: Annotated[float, Field(gt=0.0, le=1e9, description="L2 clipping bound")]
    noise_multiplier: Annotated[float, Field(
        ge=0.0, le=1e6, description="Standard deviation of the noise on the sum of the "
        "round's updates, in units of clip_norm (of the updates' share of it with "
        "adaptive clipping)")]
    noise_stddev: Annotated[float, Field(
        ge=0.0, le=1e9, description="Standard deviation of the noise this device adds to "
        "each coordinate of its clipped update")] = 0.0
    clip_count_stddev: Annotated[float, Field(ge=0.0, le=1e9)] | None = Field(
        default=None, description="Adaptive clipping: noise on the device's clip_bit; "
        "null: no clip_bit is sent")


NeighbourCount = Annotated[int, Field(ge=2, le=MAX_SELECTED, multiple_of=2)]
"""SecAgg+'s k: each device's peers in the graph (even)."""
NeighbourThreshold = Annotated[int, Field(ge=2, le=MAX_SELECTED + 1)]
"""SecAgg+: shares of one device's secret (of its k + 1 holders) that rebuild it."""


class SecAggSpec(WireModel):
    """Secure aggregation (Bonawitz et al. 2017) parameters for a round.

    With ``neighbours`` it is SecAgg+ (Bell et al. 2020): each device masks with, and
    shares its secrets among, ``neighbours`` peers of a graph derived from the roster
    (:func:`schemas.secagg.neighbour_graph`) instead of every other device.
    """

    threshold: Annotated[int, Field(ge=2, le=MAX_SELECTED, description=(
        "Devices needed at every stage; without neighbours also the shares needed to "
        "rebuild a secret"))]
    neighbours: NeighbourCount | None = Field(
        default=None, description="SecAgg+: the even number of peers each device masks with "
        "and shares its secrets among; null: every other device of the roster")
    neighbour_threshold: NeighbourThreshold | None = Field(
        default=None, description="SecAgg+: shares of a device's secret (held by it and its "
        "neighbours) needed to rebuild it; set with neighbours")
    quantization_bits: Annotated[int, Field(ge=8, le=32)] = 16
    clip_range: Annotated[float, Field(gt=0.0)] = Field(
        default=1.0, description="Values are clipped to [-clip_range, clip_range] before quantizing"
    )

    @model_validator(mode="after")
    def _graph(self) -> Self:
        check_graph_parameters(self.neighbours, self.neighbour_threshold)
        return self


def check_graph_parameters(neighbours: int | None, neighbour_threshold: int | None) -> None:
    """SecAgg+'s two parameters: both or neither, and a majority of the k + 1 holders.

    Raises:
        ValueError: one without the other, or a threshold that is not more than half of
            the ``k + 1`` holders (fewer colluding neighbours could rebuild a secret) or
            is more than all of them.
    """
    if (neighbours is None) != (neighbour_threshold is None):
        raise ValueError("neighbours and neighbour_threshold go together")
    if neighbours is not None and neighbour_threshold is not None \
            and not (neighbours + 1) / 2 < neighbour_threshold <= neighbours + 1:
        raise ValueError("neighbour_threshold is more than half of neighbours + 1 (the "
                         "holders of a secret) and at most all of them")


class HyperParams(WireModel):
    """Local training hyper-parameters sent with a round plan."""

    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    learning_rate: Annotated[float, Field(gt=0.0, le=100.0)] = 0.01
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    proximal_mu: Annotated[float, Field(ge=0.0)] = Field(
        default=0.0, description="FedProx: mu/2 * ||w - w_global||^2 added to the local loss"
    )


class RoundPlan(WireModel):
    """Retained on ``fl/{t}/round``: who trains in this round, on what, until when."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt = Field(
        default=0, description="Retry of the same round (0 first); a device trains once per "
        "(round, attempt) and updates of earlier attempts of the round still count",
    )
    global_version: Version = Field(description="Version of the weights to train from")
    nonce: RoundNonce | None = Field(
        default=None, description="Drawn at random when the cloud opens the round, kept by "
        "its attempts; an update must echo it, so one made for another opening of the "
        "round (a replay, a queued update from before the task was restarted) is refused")
    selected: list[Id] = Field(max_length=MAX_SELECTED, description="Devices asked to train")
    evaluate: list[Id] = Field(
        default_factory=list, max_length=MAX_SELECTED, description="Devices asked to evaluate"
    )
    issued_at: UnixTime
    deadline: UnixTime = Field(description="Updates arriving later are refused")
    strategy: Id = Field(description="Aggregation strategy name, e.g. `fedavg`")
    hyperparams: HyperParams = Field(default_factory=HyperParams)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    privacy: PrivacySpec | None = None
    secagg: SecAggSpec | None = None
    max_update_norm: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="Updates with a larger L2 norm are refused"
    )
    mode: Literal["sync", "async"] = Field(
        default="sync", description="`async` (FedBuff): there is no round; `selected` are the "
        "devices training now, each with its assignment number in `tickets`, and `round` "
        "is the global version being built")
    tickets: dict[Id, RoundNumber] = Field(
        default_factory=dict, max_length=MAX_SELECTED,
        description="async: each selected device's assignment; its update names the "
        "ticket as its round (a device trains once per ticket, from the newest "
        "global version it holds)")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.deadline <= self.issued_at:
            raise ValueError("deadline must be after issued_at")
        if len(set(self.selected)) != len(self.selected):
            raise ValueError("selected devices must be unique")
        if self.mode == "async" and set(self.tickets) != set(self.selected):
            raise ValueError("async: every selected device has a ticket, and only they do")
        if self.mode == "sync" and self.tickets:
            raise ValueError("tickets are for async plans")
        return self


class UpdateEnvelope(WireModel):
    """JSON envelope in the safetensors header of ``fl/{t}/rounds/{r}/updates/{d}``."""

    task: Id
    round: RoundNumber
    attempt: NonNegInt = Field(default=0, description="Attempt of the round it answers")
    device_id: Id
    base_version: Version = Field(description="Global version the delta is relative to")
    nonce: RoundNonce | None = Field(
        default=None, description="The round plan's nonce (the cloud refuses any other)")
    num_examples: PosInt = Field(description="Local training examples")
    train_loss: FiniteLoss | None = None
    train_accuracy: Fraction | None = None
    train_time_s: NonNegFloat | None = None
    compression: Compression = Compression.NONE
    clip_norm: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="DP clipping bound applied on the device"
    )
    local_steps: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = Field(
        default=None, description="Local SGD steps taken (epochs x batches; FedNova "
        "normalizes by them)")
    clip_bit: Annotated[float, Field(ge=-1e9, le=1e9)] | None = Field(
        default=None, description="Adaptive clipping: 1 if the update's norm was within "
        "clip_norm else 0, plus the plan's clip_count_stddev noise")
    sent_at: UnixTime


class GlobalModelEnvelope(WireModel):
    """JSON envelope in the safetensors header of ``fl/{t}/global/{version}``."""

    task: Id
    version: Version
    round: Annotated[int, Field(ge=0, le=999_999_999)] = Field(
        description="Round that produced these weights; 0 = initial")
    created_at: UnixTime


class EvalResult(WireModel):
    """A device's evaluation of the global model on its local data."""

    task: Id
    round: RoundNumber
    device_id: Id
    global_version: Version
    nonce: RoundNonce | None = Field(
        default=None, description="The round plan's nonce (the cloud refuses any other)")
    num_examples: PosInt
    loss: FiniteLoss
    accuracy: Fraction | None = None
    ts: UnixTime


class TaskState(StrEnum):
    """The coordinator's state machine for one task."""

    WAITING = "waiting"
    ROUND_OPEN = "round_open"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    RELEASED = "released"
    FINISHED = "finished"
    FAILED = "failed"


class Rejection(WireModel):
    """An update or evaluation refused by the coordinator, with its reason."""

    device_id: Id
    reason: Id = Field(description="Short code, e.g. `non_finite`, `norm_bound`, `not_selected`")
    detail: ShortText | None = None


class Fairness(WireModel):
    """Spread of client accuracies in a round."""

    mean: Fraction
    std: NonNegFloat
    cv: NonNegFloat = Field(description="Coefficient of variation, std / mean")
    disparity: Fraction = Field(description="Best minus worst client accuracy")


class TaskStatus(WireModel):
    """Retained on ``fl/{t}/status``: progress of a federated task."""

    task: Id
    state: TaskState
    round: Annotated[int, Field(ge=0, le=999_999_999)]
    rounds_total: PosInt
    global_version: Version | None = None
    participants: list[Id] = Field(default_factory=list, max_length=MAX_SELECTED)
    attempt: NonNegInt = Field(default=0, description="Attempt of the current round")
    rejected: list[Rejection] = Field(
        default_factory=list, max_length=MAX_REJECTION_EXAMPLES,
        description="The last refused updates of the round, with reasons (examples)",
    )
    rejected_counts: dict[Id, NonNegInt] = Field(
        default_factory=dict, max_length=64,
        description="Refused updates of the round, counted by reason",
    )
    train_loss: FiniteLoss | None = None
    eval_loss: FiniteLoss | None = None
    eval_accuracy: Fraction | None = None
    central_accuracy: Fraction | None = None
    fairness: Fairness | None = None
    bytes_received: NonNegInt = 0
    duration_s: NonNegFloat | None = None
    slowest_client_s: NonNegFloat | None = Field(
        default=None, description="Longest local training time reported in the round, s"
    )
    epsilon_spent: NonNegFloat | None = Field(
        default=None, description="Differential-privacy epsilon spent so far (at the "
        "task's delta)"
    )
    dp_clip_norm: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="Differential privacy: the L2 bound of the last round")
    dp_noise_multiplier: NonNegFloat | None = Field(
        default=None, description="Differential privacy: noise on the sum of a round's "
        "updates, in units of the bound")
    message: ShortText | None = Field(default=None, description="Why the task failed or stopped")
    mode: Literal["sync", "async"] = "sync"
    training: NonNegInt | None = Field(
        default=None, description="async: devices holding an assignment now")
    buffered: NonNegInt | None = Field(
        default=None, description="async: updates waiting in the buffer for the next version")
    staleness_mean: NonNegFloat | None = Field(
        default=None, description="async: mean staleness (versions) of the last version's "
        "updates")
    staleness_max: NonNegInt | None = Field(
        default=None, description="async: largest staleness in the last version")
    ts: UnixTime


def split_control(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                              dict[str, np.ndarray]]:
    """(weights or delta, SCAFFOLD control variate) from a payload's tensors."""
    plain = {k: v for k, v in tensors.items() if not k.startswith(CONTROL_PREFIX)}
    control = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items()
               if k.startswith(CONTROL_PREFIX)}
    return plain, control


def with_control(tensors: Mapping[str, np.ndarray], control: Mapping[str, np.ndarray],
                 ) -> dict[str, np.ndarray]:
    """``tensors`` and ``control`` in one payload (the control's names prefixed)."""
    return {**tensors, **{CONTROL_PREFIX + k: v for k, v in control.items()}}
