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


MAX_VARIANTS = 8


def check_chunks(size_bytes: int, chunk_size: int, chunk_count: int) -> None:
    """Raise ValueError unless ``chunk_count == ceil(size_bytes / chunk_size)``."""
    expected = math.ceil(size_bytes / chunk_size)
    if chunk_count != expected:
        raise ValueError(f"chunk_count {chunk_count} != ceil(size_bytes / chunk_size) = "
                         f"{expected}")


class ReleaseVariant(WireModel):
    """Another build of the same release (another format or precision) a device may take.

    Its chunks are on ``models/{m}/chunks/{variant version}/{i}``, like a release's.
    """

    version: Version
    format: ModelFormat
    size_bytes: Annotated[int, Field(ge=1, le=INT64_MAX, description="Model file size, bytes")]
    sha256: Sha256Hex
    chunk_size: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)]
    chunk_count: Annotated[int, Field(ge=1, le=MAX_CHUNKS)]
    input_shape: list[Annotated[int, Field(ge=-1, le=INT64_MAX)]] | None = Field(
        default=None, max_length=8)
    requirements: Requirements = Field(default_factory=Requirements)

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> Self:
        check_chunks(self.size_bytes, self.chunk_size, self.chunk_count)
        return self


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
    variants: list[ReleaseVariant] = Field(
        default_factory=list, max_length=MAX_VARIANTS,
        description="Other builds of this release; a device takes the first of the "
        "candidates (this manifest's own build, then the variants, or the order `prefer` "
        "gives for its device class) that it can load")
    prefer: dict[Annotated[str, Field(max_length=64)],
                 list[Version]] = Field(
        default_factory=dict, max_length=64,
        description="Device class (`machine/Ncpu`) -> versions fastest first, as the fleet "
        "benchmark measured them on that class")

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> Self:
        check_chunks(self.size_bytes, self.chunk_size, self.chunk_count)
        versions = [self.version, *(v.version for v in self.variants)]
        if len(set(versions)) != len(versions):
            raise ValueError("the variants' versions must differ from each other and from "
                             "the release's")
        for order in self.prefer.values():
            if not set(order) <= set(versions):
                raise ValueError("prefer names a version that is not a build of the release")
        return self

    def builds(self) -> list[ReleaseManifest]:
        """This release as one manifest per build (the own one first), without variants.

        Each has the release's targeting, key and metadata; only the first carries
        the signature (the others are derived from signed content, not signed).
        """
        own = self.model_copy(update={"variants": [], "prefer": {}})
        out = [own]
        for variant in self.variants:
            out.append(self.model_copy(update={
                "version": variant.version, "format": variant.format,
                "size_bytes": variant.size_bytes, "sha256": variant.sha256,
                "chunk_size": variant.chunk_size, "chunk_count": variant.chunk_count,
                "input_shape": variant.input_shape, "variants": [], "prefer": {},
                "targeting": self.targeting.model_copy(
                    update={"requirements": variant.requirements}),
                "signature": None}))
        return out

    def _omitted(self) -> set[str]:
        """Members left out of the published form: an empty ``variants`` and ``prefer``.

        A release without variants is then byte for byte what devices before them read.
        """
        return {name for name in ("variants", "prefer") if not getattr(self, name)}

    def to_json(self) -> bytes:
        """The published form (compact JSON)."""
        return self.model_dump_json(exclude=self._omitted()).encode()

    def signing_bytes(self) -> bytes:
        """The bytes the signature covers: RFC 8785 JSON of the published form, unsigned."""
        body: dict[str, Any] = self.model_dump(mode="json",
                                               exclude={"signature", *self._omitted()})
        return rfc8785.dumps(body)

    def chunk_length(self, index: int) -> int:
        """Exact length of chunk ``index`` (the last one may be shorter)."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.size_bytes - self.chunk_size * (self.chunk_count - 1)
