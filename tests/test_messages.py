"""Message models: JSON round trips, bounds, boundary decoding."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from schemas.base import decode_message
from schemas.catalog import JSON_MESSAGES
from schemas.device import DeploymentState, DeploymentStatus, DeviceState, DeviceTelemetry
from schemas.errors import DecodeError
from schemas.fl import RoundPlan
from schemas.release import ReleaseManifest
from tests.examples import EXAMPLES, T0


def test_every_message_has_an_example() -> None:
    assert set(JSON_MESSAGES) <= set(EXAMPLES)


@pytest.mark.parametrize("model", list(EXAMPLES), ids=lambda m: m.__name__)
def test_json_round_trip(model: type[BaseModel]) -> None:
    original = EXAMPLES[model]
    payload = original.model_dump_json().encode()
    decoded = decode_message(model, payload)
    assert decoded == original
    assert json.loads(payload)["schema_version"] == 1


@pytest.mark.parametrize("model", list(EXAMPLES), ids=lambda m: m.__name__)
def test_models_are_frozen(model: type[BaseModel]) -> None:
    with pytest.raises(ValidationError):
        EXAMPLES[model].schema_version = 2  # type: ignore[attr-defined]


def _telemetry(**changes: object) -> bytes:
    body = json.loads(EXAMPLES[DeviceTelemetry].model_dump_json())
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("field", "value"), [
    ("cpu_percent", 100.1), ("cpu_percent", -1), ("memory_percent", 250),
    ("disk_percent", "full"), ("prediction_count", -3), ("seq", -1),
    ("temperature_c", 1e6), ("ts", 12.0), ("ts", 1e12), ("device_id", "a/b"),
    ("schema_version", 2), ("network_latency_ms", -0.5), ("interval_s", 0),
])
def test_telemetry_bounds(field: str, value: object) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(DeviceTelemetry, _telemetry(**{field: value}))
    assert info.value.reason == "validation"
    assert field in info.value.detail


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_floats_are_refused(literal: str) -> None:
    payload = _telemetry(cpu_percent=1.0).replace(b'"cpu_percent":1.0', b'"cpu_percent":'
                                                  + literal.encode())
    payload = payload.replace(b'"cpu_percent": 1.0', b'"cpu_percent": ' + literal.encode())
    assert literal.encode() in payload
    with pytest.raises(DecodeError):
        decode_message(DeviceTelemetry, payload)


def test_error_rate_is_derived_and_missing_sensors_are_null() -> None:
    t = decode_message(DeviceTelemetry, _telemetry(temperature_c=None))
    assert t.temperature_c is None
    assert t.error_rate_percent == pytest.approx(2.5)
    assert json.loads(t.model_dump_json())["error_rate_percent"] == pytest.approx(2.5)


def test_unknown_fields_are_ignored_for_rolling_upgrades() -> None:
    t = decode_message(DeviceTelemetry, _telemetry(new_sensor_from_v1_1=3))
    assert t == EXAMPLES[DeviceTelemetry]


def test_decode_refuses_oversized_empty_and_garbage() -> None:
    with pytest.raises(DecodeError) as big:
        decode_message(DeviceTelemetry, b" " * 300_000)
    assert big.value.reason == "too_large"
    with pytest.raises(DecodeError) as empty:
        decode_message(DeviceTelemetry, b"")
    assert empty.value.reason == "empty"
    with pytest.raises(DecodeError) as garbage:
        decode_message(DeviceTelemetry, b"\xff\xfe{")
    assert garbage.value.reason == "invalid_json"


def test_birth_must_declare_hardware() -> None:
    with pytest.raises(ValidationError, match="hardware"):
        DeviceState(device_id="d", state="online", bd_seq=0, ts=T0)
    DeviceState(device_id="d", state="offline", bd_seq=0, ts=T0, reason="lwt")


def test_failed_deployment_needs_a_reason() -> None:
    with pytest.raises(ValidationError):
        DeploymentStatus(device_id="d", model="m", ts=T0, state=DeploymentState.FAILED)
    with pytest.raises(ValidationError):
        DeploymentStatus(device_id="d", model="m", ts=T0, state=DeploymentState.INCOMPATIBLE)


def test_round_plan_consistency() -> None:
    plan = EXAMPLES[RoundPlan]
    body = json.loads(plan.model_dump_json())
    with pytest.raises(DecodeError, match="deadline"):
        decode_message(RoundPlan, json.dumps({**body, "deadline": body["issued_at"]}))
    with pytest.raises(DecodeError, match="unique"):
        decode_message(RoundPlan, json.dumps({**body, "selected": ["a", "a"]}))


def test_manifest_chunking_and_signing_bytes() -> None:
    manifest = EXAMPLES[ReleaseManifest]
    assert isinstance(manifest, ReleaseManifest)
    assert [manifest.chunk_length(i) for i in range(3)] == [1_048_576, 1_048_576, 402_848]
    with pytest.raises(IndexError):
        manifest.chunk_length(3)
    signed = manifest.signing_bytes()
    assert b"signature" not in signed
    # The receiver recomputes the same bytes from what it parsed.
    again = decode_message(ReleaseManifest, manifest.model_dump_json())
    assert again.signing_bytes() == signed
    unsigned = manifest.model_copy(update={"signature": None})
    assert unsigned.signing_bytes() == signed
    body = json.loads(manifest.model_dump_json())
    with pytest.raises(DecodeError, match="chunk_count"):
        decode_message(ReleaseManifest, json.dumps({**body, "chunk_count": 4}))


def test_targeting() -> None:
    targeting = EXAMPLES[ReleaseManifest].targeting  # type: ignore[attr-defined]
    assert targeting.targets("pi-01")
    assert not targeting.targets("pi-02")
    fleet = targeting.model_copy(update={"stage": "fleet"})
    assert fleet.targets("pi-02")
