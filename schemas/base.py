"""Shared base model, field types and the JSON boundary decoder.

Every JSON message on the wire is a frozen :class:`WireModel` with a
``schema_version``. Unknown fields are ignored, so a newer producer that adds an
optional field does not break an older consumer during a rolling upgrade; a
breaking change bumps ``schema_version``, which an old consumer refuses.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from schemas.errors import DecodeError
from schemas.topics import ID_PATTERN, VERSION_PATTERN

SCHEMA_VERSION: Final = 1
DEFAULT_MAX_JSON_BYTES: Final = 256 * 1024
"""Largest JSON message accepted by :func:`decode_message` unless told otherwise."""

Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN}$")]
"""Device id, model name, task name, rule name: ``[A-Za-z0-9_-]{1,64}``."""
Version = Annotated[str, StringConstraints(pattern=rf"^{VERSION_PATTERN}$")]
"""Model or weights version: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
INT64_MAX: Final = 2**63 - 1
"""Every integer on the wire fits a signed 64-bit integer (SQLite, InfluxDB, numpy)."""
NonNegInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PosInt = Annotated[int, Field(ge=1, le=INT64_MAX)]
RoundNumber = Annotated[int, Field(ge=1, le=999_999_999)]
"""A federated round: what a topic level can name (nine digits)."""
UnixTime = Annotated[
    float,
    Field(
        ge=1_000_000_000.0,
        le=32_503_680_000.0,
        description="Unix time in seconds (UTC), after 2001-09-09 and before 3000-01-01",
    ),
]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
RoundNonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
"""128 random bits (hex) the cloud draws each time it opens a round; answers echo it."""


def now() -> float:
    """Current Unix time in seconds; the one clock every message is stamped with."""
    return time.time()


class Severity(StrEnum):
    """Alert severity, most severe first."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"


class ModelFormat(StrEnum):
    """Model file formats an edge runtime can load."""

    ONNX = "onnx"
    TFLITE = "tflite"
    TORCHSCRIPT = "torchscript"


class RuntimeName(StrEnum):
    """Inference runtimes an edge node may have installed."""

    ONNXRUNTIME = "onnxruntime"
    LITERT = "litert"
    TORCHSCRIPT = "torchscript"


class WireModel(BaseModel):
    """Base of every JSON message: frozen, finite floats, versioned."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        allow_inf_nan=False,
        str_max_length=65536,
        use_enum_values=False,
        validate_default=True,
    )

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION,
        description="Version of this message's schema; a consumer refuses versions it does "
        "not know.",
    )

    @field_validator("schema_version", mode="before")
    @classmethod
    def _no_bool_version(cls, value: object) -> object:
        if isinstance(value, bool):  # True == 1 in Python; on the wire it is not a version
            raise ValueError("schema_version must be the integer 1")  # noqa: TRY004
        return value

    def to_json(self) -> bytes:
        """Serialize to compact UTF-8 JSON bytes for the wire."""
        return self.model_dump_json().encode()


M = TypeVar("M", bound=BaseModel)


def decode_message(
    model: type[M], payload: bytes | bytearray | memoryview | str,
    *, max_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> M:
    """Validate one JSON payload at the boundary.

    Args:
        model: the message class expected on the topic.
        payload: the raw MQTT payload.
        max_bytes: refuse larger payloads before parsing them.

    Returns:
        The validated, frozen message.

    Raises:
        DecodeError: ``too_large``, ``empty``, ``invalid_json`` or ``validation``;
            the detail names the offending fields. Nothing else escapes.
    """
    what = model.__name__
    if isinstance(payload, str):
        payload = payload.encode("utf-8", errors="surrogatepass")
    size = len(payload)
    if size > max_bytes:
        raise DecodeError("too_large", f"{size} bytes > limit {max_bytes}", what=what)
    if size == 0:
        raise DecodeError("empty", "empty payload", what=what)
    try:
        # Strict: no bool for a number, no string for a number or a bool (JSON's own
        # number forms only; an integer where a float is expected is fine).
        return model.model_validate_json(bytes(payload), strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise DecodeError("invalid_json", str(errors[0]["msg"]), what=what) from None
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]
        )
        raise DecodeError("validation", detail, what=what) from None
