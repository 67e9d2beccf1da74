"""Configuration of a federated task (every field of the seed's FederatedConfig)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from schemas.base import Id
from schemas.client_settings import SettingsSection
from schemas.fl import Compression, CompressionSpec, HyperParams


class SelectionSettings(SettingsSection):
    """Which online devices are asked to train."""

    policy: Literal["random", "resource_aware", "fair"] = "random"
    min_battery_percent: float = 30.0
    max_temperature_c: float = 70.0
    max_cpu_percent: float = 80.0
    max_latency_ms: float = 500.0
    runtime: str = Field(default="torchscript", description="Runtime the task trains with")
    min_memory_mb: float = 0.0


class AdaptiveClipConfig(SettingsSection):
    """Adaptive clipping (Andrew et al. 2021): the bound follows a quantile of the norms."""

    target_quantile: float = Field(default=0.5, gt=0, lt=1, description="Share of updates "
                                   "that should fall within the bound")
    learning_rate: float = Field(default=0.2, gt=0, le=10,
                                 description="Geometric step: C <- C * exp(-lr * (b - q))")
    initial_clip: float = Field(default=0.1, gt=0, description="Bound of the first round")
    count_stddev: float | None = Field(
        default=None, ge=0, description="Noise on the sum of the clipped bits (privatizes "
        "them); default max(expected devices / 20, noise_multiplier)")


class PrivacyConfig(SettingsSection):
    """Differential privacy of the task's updates (user-level DP-FedAvg).

    Each selected device clips its whole update to the L2 bound; Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm`` on the sum of a round's
    updates is added on the devices (``client``: each adds all of it, a local
    guarantee that needs no trusted server), by the server after summing
    (``central``: the server is trusted), or split over the devices so that the sum
    carries it (``distributed``: for secure aggregation). The privacy spent is
    accounted with Google's dp-accounting.
    """

    mode: Literal["client", "central", "distributed"] = "central"
    clip_norm: float | None = Field(default=None, gt=0, description="Fixed L2 bound")
    adaptive_clip: AdaptiveClipConfig | None = None
    noise_multiplier: float | None = Field(
        default=None, ge=0, le=1000, description="Noise on the sum of a round's updates, "
        "in units of the clipping bound; calibrated from target_epsilon when not given")
    target_epsilon: float | None = Field(
        default=None, gt=0, le=1000, description="The budget: a round that would take the "
        "task past it is not opened (the task finishes, `privacy_budget`); without "
        "noise_multiplier, the multiplier is calibrated so that all rounds fit")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"

    @model_validator(mode="after")
    def _one_of_each(self) -> Self:
        if (self.clip_norm is None) == (self.adaptive_clip is None):
            raise ValueError("give clip_norm or adaptive_clip (one of them)")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give noise_multiplier, target_epsilon, or both")
        if self.mode == "client" and self.adaptive_clip is not None:
            raise ValueError("adaptive clipping privatizes the sum of the devices' clip bits "
                             "once (central or distributed mode); in client mode every bit "
                             "would carry the whole noise and the bound would wander: give "
                             "clip_norm")
        return self


SECAGG_STRATEGIES = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                               "fedprox", "fedbn"})
"""Strategies that need only the mean of the updates (secure aggregation gives no more)."""


class SecAggConfig(SettingsSection):
    """Secure aggregation (Bonawitz et al. 2017): the cloud sums masked updates it cannot read.

    Each selected device must be provisioned with an identity key (``broker add-device``).
    Updates are clipped per coordinate to ``clip_range`` and quantized to
    ``quantization_bits``; every update weighs the same.
    """

    threshold: float = Field(
        default=2 / 3, gt=0, le=1, description="Share of the selected devices needed at every "
        "stage (and to rebuild a dropped device's masks); at least 2 devices")
    quantization_bits: int = Field(default=16, ge=8, le=24)
    clip_range: float = Field(default=0.5, gt=0, description="Each coordinate of an update is "
                              "clipped to [-clip_range, clip_range] before quantization")
    stage_timeout_s: float = Field(default=30.0, gt=0, description="How long the key, share "
                                   "and unmasking stages wait for the devices")
    neighbours: int | Literal["auto"] | None = Field(
        default=None, description="SecAgg+ (Bell et al. 2020): each device masks with and "
        "shares its secrets among k peers (even) of a graph the round's keys fix, instead "
        "of all: its work grows with k, not with the cohort. With d = selected - needed "
        "drop-outs allowed, k is at least 2d (auto: exactly that) and a secret needs "
        "k + 1 - d of its k + 1 holders: any d drop-outs leave the graph connected and "
        "every secret rebuildable. null: every device masks with every other (Bonawitz "
        "et al.)")

    @model_validator(mode="after")
    def _even_neighbours(self) -> Self:
        if isinstance(self.neighbours, int) and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError("secagg.neighbours is an even number of at least 2 (each device "
                             "is joined to k/2 devices on each side of it in the graph)")
        return self


ASYNC_STRATEGIES = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                              "fedprox", "fedbn"})
"""Strategies whose aggregate is a weighted mean of deltas (FedBuff's buffer is one)."""


class FedBuffConfig(SettingsSection):
    """Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): ``mode: async``.

    Up to ``concurrency`` online members train at once, each on the newest global
    version it holds; every ``buffer_size`` accepted updates make a new version. An
    update trained ``s`` versions ago is scaled by ``1 / (1 + s) ** staleness_exponent``
    before it joins the example-weighted mean, and refused past ``max_staleness``.
    ``rounds`` counts versions; ``round_timeout_s`` is how long an assignment stays open.
    """

    buffer_size: int = Field(default=3, ge=1, le=10_000,
                             description="K: accepted updates per new global version")
    concurrency: int = Field(default=5, ge=1, le=10_000,
                             description="Online devices training at once")
    max_staleness: int = Field(default=5, ge=0, description="Updates trained on a version "
                               "more than this many versions old are refused (too_stale)")
    staleness_exponent: float = Field(default=0.5, ge=0, le=4, description="Scale "
                                      "1/(1+s)^a; 0.5 is FedBuff's 1/sqrt(1+s), 0 none")


class FLTaskConfig(SettingsSection):
    """Every field of the seed's FederatedConfig, and the strategy's parameters."""

    task: str = Field(description="Import path, `package.module:Class`")
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(default=10, ge=1)
    fraction_fit: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=0.0, ge=0, le=1)
    min_fit_clients: int = Field(default=2, ge=1)
    min_evaluate_clients: int = Field(default=0, ge=0)
    min_available_clients: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=60.0, gt=0)
    accept_failures: bool = Field(default=True, description="Retry a round that got too few "
                                  "updates (up to max_round_retries) instead of failing")
    max_round_retries: int = Field(default=3, ge=0)
    hyperparams: HyperParams = Field(default_factory=HyperParams)
    strategy: Id = "fedavg"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    privacy: PrivacyConfig | None = None
    secagg: SecAggConfig | None = None
    max_update_norm: float | None = Field(default=None, gt=0)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    target_accuracy: float | None = Field(default=None, gt=0, le=1,
                                          description="Stop early when central accuracy reaches it")
    patience: int | None = Field(default=None, ge=1,
                                 description="Stop after this many rounds without improvement")
    min_delta: float = 0.001
    seed: int = 0
    model_name: Id | None = Field(
        default=None, description="Registry model the final (and best) weights are registered "
        "under; default: the task's name")
    keep_update_rounds: int = Field(
        default=0, ge=0, description="Keep the update files of the last N released rounds "
        "(audit, replay); 0 deletes a round's files once it is released")
    mode: Literal["sync", "async"] = Field(
        default="sync", description="sync: rounds of selected cohorts; async: FedBuff "
        "(see fedbuff)")
    fedbuff: FedBuffConfig = Field(default_factory=FedBuffConfig)

    @model_validator(mode="after")
    def _async_fits(self) -> Self:
        if self.mode != "async":
            return self
        if self.secagg is not None:
            raise ValueError(
                "secure aggregation needs a cohort: its devices agree keys and share mask "
                "seeds with each other before any of them uploads, and only their sum opens. "
                "An async buffer fills one update at a time from devices that never met, so "
                "there is no cohort to mask with: use mode sync for secagg")
        if self.strategy not in ASYNC_STRATEGIES:
            raise ValueError(
                f"async mode aggregates a staleness-weighted mean of buffered deltas; "
                f"{self.strategy} needs updates trained on the version being aggregated "
                f"(a cohort): use one of {', '.join(sorted(ASYNC_STRATEGIES))}")
        if self.privacy is not None:
            raise ValueError(
                "differential privacy is accounted per round of a sampled cohort (the "
                "sampling rate amplifies it); async updates are not a sampled cohort and "
                "their accounting is not implemented: use mode sync for privacy")
        return self

    @model_validator(mode="after")
    def _secagg_fits(self) -> Self:
        if self.secagg is None:
            return self
        if self.strategy not in SECAGG_STRATEGIES:
            raise ValueError(
                f"secure aggregation gives the cloud the sum of the updates only; "
                f"{self.strategy} needs every update as sent: use one of "
                f"{', '.join(sorted(SECAGG_STRATEGIES))}")
        if self.min_fit_clients < 2:
            raise ValueError("secure aggregation needs min_fit_clients >= 2 (one device's "
                             "sum is its update)")
        if self.max_update_norm is not None:
            raise ValueError("max_update_norm checks each update; with secure aggregation "
                             "the cloud sees none: bound updates with secagg.clip_range or "
                             "privacy.clip_norm")
        if self.compression.kind is not Compression.NONE:
            raise ValueError("secure aggregation quantizes updates itself: leave compression "
                             "at none")
        privacy = self.privacy
        if privacy is not None and (privacy.mode == "central" or privacy.adaptive_clip):
            raise ValueError("with secure aggregation the devices clip and noise: use privacy "
                             "mode distributed (or client) with a fixed clip_norm")
        return self

