"""Configuration of a federated task (every field of the seed's FederatedConfig)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.base import Id
from schemas.client_settings import SettingsSection
from schemas.fl import CompressionSpec, HyperParams


class SelectionSettings(SettingsSection):
    """Which online devices are asked to train."""

    policy: Literal["random", "resource_aware", "fair"] = "random"
    min_battery_percent: float = 30.0
    max_temperature_c: float = 70.0
    max_cpu_percent: float = 80.0
    max_latency_ms: float = 500.0
    runtime: str = Field(default="torchscript", description="Runtime the task trains with")
    min_memory_mb: float = 0.0


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

