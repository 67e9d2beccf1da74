"""The model release manifest: what a device needs to fetch, verify and install a model."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Self

import rfc8785
from pydantic import Field, JsonValue, model_validator

from schemas.base import (
    INT64_MAX,
    Id,
    ModelFormat,
    NonNegFloat,
    RuntimeName,
    Sha256Hex,
    UnixTime,
    Version,
    WireModel,
)

MAX_CHUNKS = 65_536
MAX_CHUNK_BYTES = 8 * 1024 * 1024


class Requirements(WireModel):
    """What a device must have to run the model (the seed's compatibility check)."""

    formats: list[ModelFormat] = Field(
        default_factory=list, description="The device must load one of these formats"
    )
    runtimes: list[RuntimeName] = Field(
        default_factory=list, description="The device must have one of these runtimes"
    )
    min_memory_mb: NonNegFloat = Field(default=0.0, description="Available memory needed, MiB")
    gpu: bool = Field(default=False, description="A GPU/NPU is required")


class Targeting(WireModel):
    """Which devices a release is for."""

    stage: Literal["canary", "fleet"] = Field(
        default="fleet", description="`canary`: only `canary` devices install; `fleet`: all targets"
    )
    devices: list[Id] | None = Field(
        default=None, max_length=100_000, description="Explicit device list; null = every device"
    )
    canary: list[Id] = Field(default_factory=list, max_length=100_000)
    requirements: Requirements = Field(default_factory=Requirements)

    def targets(self, device_id: str) -> bool:
        """Whether ``device_id`` should install this release at its current stage."""
        if self.stage == "canary":
            return device_id in self.canary
        return self.devices is None or device_id in self.devices or device_id in self.canary


class ReleaseManifest(WireModel):
    """Retained on ``models/{m}/release``; signed with Ed25519 by the cloud's release key.

    The chunks are published (retained) before the manifest. ``signature`` is the
    base64 Ed25519 signature over the RFC 8785 (JSON Canonicalization Scheme) form
    of the manifest as published, without its ``signature`` member: any language
    re-creates those bytes with a JCS library (for example npm ``canonicalize``)
    and verifies them with the public key named by ``key_id``, which devices
    configure as base64 of its 32 raw bytes.
    """

    model: Id
    version: Version
    format: ModelFormat
    size_bytes: Annotated[int, Field(ge=1, le=INT64_MAX, description="Model file size, bytes")]
    sha256: Sha256Hex = Field(description="SHA-256 of the whole model file, lowercase hex")
    chunk_size: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES, description="Bytes per chunk")]
    chunk_count: Annotated[int, Field(ge=1, le=MAX_CHUNKS)]
    created_at: UnixTime
    targeting: Targeting = Field(default_factory=Targeting)
    key_id: Id = Field(description="Name of the signing key, so devices can rotate keys")
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")] | None = Field(
        default=None, description="Base64 Ed25519 signature over signing_bytes()"
    )
    input_shape: list[Annotated[int, Field(ge=-1, le=INT64_MAX)]] | None = Field(
        default=None, max_length=8, description="Model input shape, -1 for a dynamic dimension"
    )
    metadata: dict[Annotated[str, Field(max_length=64)], JsonValue] = Field(
        default_factory=dict, description="Lineage: task, rounds, metrics, source version"
    )

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> Self:
        expected = math.ceil(self.size_bytes / self.chunk_size)
        if self.chunk_count != expected:
            raise ValueError(
                f"chunk_count {self.chunk_count} != ceil(size_bytes / chunk_size) = {expected}"
            )
        return self

    def signing_bytes(self) -> bytes:
        """The bytes the signature covers: RFC 8785 canonical JSON, ``signature`` left out."""
        body: dict[str, Any] = self.model_dump(mode="json", exclude={"signature"})
        return rfc8785.dumps(body)

    def chunk_length(self, index: int) -> int:
        """Exact length of chunk ``index`` (the last one may be shorter)."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.size_bytes - self.chunk_size * (self.chunk_count - 1)
