"""A release with variants: the wire form, the device's choice, the cloud's resolution.

No broker here; ``tests/test_rollouts.py`` rolls a release with variants out to real
agents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from cloud.models.formats import ArtifactFormat
from cloud.models.registry import ModelRegistry, VersionState
from cloud.models.variants import VariantError, resolve
from cloud.releases import build_release
from cloud.storage.sqlite_store import SqliteStore
from edge_node.errors import InstallError
from edge_node.ota import Capabilities, choose_build
from edge_node.release_verify import verify_manifest
from schemas.base import ModelFormat, RuntimeName, decode_message
from schemas.release import ReleaseManifest, ReleaseVariant, Requirements

KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"variants").digest())
KEYS = {"k1": KEY.public_key()}
DATA = b"\x01" * 10_000


def _variant(version: str, fmt: ModelFormat, size: int = 5_000, **extra: object,
             ) -> ReleaseVariant:
    return ReleaseVariant.model_validate({
        "version": version, "format": fmt, "size_bytes": size,
        "sha256": hashlib.sha256(version.encode()).hexdigest(), "chunk_size": 4096,
        "chunk_count": -(-size // 4096), **extra})


def _release(variants: list[ReleaseVariant] | None = None,
             prefer: dict[str, list[str]] | None = None) -> ReleaseManifest:
    manifest, _ = build_release("m", "1.0.0-onnx", DATA, fmt=ModelFormat.ONNX, key=KEY,
                                key_id="k1", chunk_size=4096, variants=variants, prefer=prefer)
    return manifest


def _caps(*formats: ModelFormat, device_class: str = "x86_64/2cpu") -> Capabilities:
    return Capabilities(formats=frozenset(formats), runtimes=frozenset(RuntimeName),
                        gpu=False, available_memory_mb=lambda: 4096.0,
                        device_class=device_class)


def test_a_release_without_variants_is_published_as_before() -> None:
    manifest = _release()
    body = json.loads(manifest.to_json())
    assert "variants" not in body and "prefer" not in body  # what older devices read
    verify_manifest(decode_message(ReleaseManifest, manifest.to_json()), KEYS)


def test_the_signature_covers_the_variants_and_the_preferences() -> None:
    ts = _variant("1.0.0-torchscript", ModelFormat.TORCHSCRIPT)
    manifest = decode_message(ReleaseManifest, _release(
        [ts], {"aarch64/4cpu": ["1.0.0-torchscript", "1.0.0-onnx"]}).to_json())
    verify_manifest(manifest, KEYS)
    # Canonical JSON of the published form: what any language re-creates from the payload.
    body = json.loads(manifest.to_json())
    body.pop("signature")
    assert manifest.signing_bytes() == rfc8785.dumps(body)
    swapped = manifest.model_copy(update={"variants": [ts.model_copy(
        update={"sha256": "0" * 64})]})
    with pytest.raises(InstallError, match="signature"):
        verify_manifest(swapped, KEYS)
    reordered = manifest.model_copy(update={"prefer": {"aarch64/4cpu": ["1.0.0-onnx"]}})
    with pytest.raises(InstallError, match="signature"):
        verify_manifest(reordered, KEYS)


def test_builds_are_whole_manifests_of_each_variant() -> None:
    ts = _variant("1.0.0-torchscript", ModelFormat.TORCHSCRIPT, 9_000,
                  requirements={"runtimes": ["torchscript"]})
    own, other = _release([ts]).builds()
    assert (own.version, own.format, own.size_bytes) == ("1.0.0-onnx", ModelFormat.ONNX, 10_000)
    assert (other.version, other.format, other.size_bytes, other.chunk_count) == (
        "1.0.0-torchscript", ModelFormat.TORCHSCRIPT, 9_000, 3)
    assert other.targeting.requirements.runtimes == [RuntimeName.TORCHSCRIPT]
    assert other.sha256 == ts.sha256 and not other.variants and other.signature is None


def test_variants_must_be_distinct_and_preferences_name_builds() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        _release([_variant("1.0.0-onnx", ModelFormat.ONNX)])
    with pytest.raises(ValidationError, match="not a build"):
        _release([_variant("1.0.0-ts", ModelFormat.TORCHSCRIPT)], {"c": ["9.9.9"]})
    with pytest.raises(ValidationError, match="chunk_count"):
        _variant("1.0.0-ts", ModelFormat.TORCHSCRIPT, 5_000, chunk_count=1)


def test_a_device_takes_the_first_build_it_can_load_in_its_class_order() -> None:
    ts = _variant("1.0.0-torchscript", ModelFormat.TORCHSCRIPT)
    tfl = _variant("1.0.0-tflite", ModelFormat.TFLITE)
    manifest = _release([ts, tfl], {"aarch64/4cpu": ["1.0.0-tflite", "1.0.0-onnx"]})
    everything = (ModelFormat.ONNX, ModelFormat.TORCHSCRIPT, ModelFormat.TFLITE)
    # No preference for this class: the manifest's order, the release's own build first.
    build, _ = choose_build(manifest, _caps(*everything), "x86_64/2cpu")
    assert build is not None and build.version == "1.0.0-onnx"
    build, _ = choose_build(manifest, _caps(ModelFormat.TORCHSCRIPT), "x86_64/2cpu")
    assert build is not None and build.version == "1.0.0-torchscript"
    # Its class measured TFLite fastest; then the rest in the manifest's order.
    build, _ = choose_build(manifest, _caps(*everything), "aarch64/4cpu")
    assert build is not None and build.version == "1.0.0-tflite"
    build, _ = choose_build(manifest, _caps(ModelFormat.ONNX, ModelFormat.TORCHSCRIPT),
                            "aarch64/4cpu")
    assert build is not None and build.version == "1.0.0-onnx"
    # A build that failed here before is passed over for the next.
    build, _ = choose_build(manifest, _caps(*everything), "aarch64/4cpu",
                            lambda b: b.version == "1.0.0-tflite")
    assert build is not None and build.version == "1.0.0-onnx"
    # None fits: every build's reason.
    build, reasons = choose_build(manifest, _caps(), "x86_64/2cpu")
    assert build is None and len(reasons) == 3 and reasons[1].startswith("1.0.0-torchscript")
    lone, reasons = choose_build(_release(), _caps(), "x86_64/2cpu")
    assert lone is None and reasons == ["format onnx not supported (have: none)"]


def test_a_variant_s_requirements_count_for_it_alone() -> None:
    big = _variant("1.0.0-torchscript", ModelFormat.TORCHSCRIPT,
                   requirements=Requirements(min_memory_mb=1e6).model_dump())
    manifest = _release([big], {"c": ["1.0.0-torchscript", "1.0.0-onnx"]})
    build, _ = choose_build(manifest, _caps(ModelFormat.ONNX, ModelFormat.TORCHSCRIPT), "c")
    assert build is not None and build.version == "1.0.0-onnx"


# -- the cloud's side: which variants, which order --------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(SqliteStore(tmp_path / "store.sqlite3"), tmp_path / "artifacts")


def _register(registry: ModelRegistry, version: str, fmt: ArtifactFormat, *,
              parent: str | None = "1.0.0", state: VersionState = VersionState.DRAFT,
              p50: float | None = None) -> None:
    registry.register("m", version, version.encode(), fmt, parent_version=parent, state=state,
                      metrics={"latency_ms_p50": p50} if p50 is not None else None,
                      metrics_source="optimizer")


def test_auto_takes_the_deployable_siblings_within_tolerance(registry: ModelRegistry) -> None:
    _register(registry, "1.0.0", ArtifactFormat.WEIGHTS, parent=None)
    _register(registry, "1.0.0-onnx", ArtifactFormat.ONNX, p50=0.05)
    _register(registry, "1.0.0-onnx-int8-dynamic", ArtifactFormat.ONNX, p50=0.09)
    _register(registry, "1.0.0-torchscript", ArtifactFormat.TORCHSCRIPT, p50=0.03)
    _register(registry, "1.0.0-tflite-int8", ArtifactFormat.TFLITE,
              state=VersionState.REJECTED, p50=0.01)
    _register(registry, "1.0.0-tflite", ArtifactFormat.TFLITE, p50=0.02)
    registry.set_state("m", "1.0.0-tflite", VersionState.RETIRED, "test")
    _register(registry, "1.1.0-onnx", ArtifactFormat.ONNX, parent=None)  # another lineage
    release = registry.get("m", "1.0.0-onnx")
    builds = resolve(registry, release, [], auto=True)
    # Ordered by the latency measured here; rejected, retired and weights left out.
    assert [v.version for v in builds.variants] == ["1.0.0-torchscript",
                                                    "1.0.0-onnx-int8-dynamic"]
    assert builds.prefer == {}  # the optimizer's figures belong to no device class
    assert resolve(registry, release, [], auto=False).variants == []
    named = resolve(registry, release, ["1.0.0-onnx-int8-dynamic"], auto=True)
    assert [v.version for v in named.variants] == ["1.0.0-onnx-int8-dynamic",
                                                   "1.0.0-torchscript"]
    for bad, why in (("1.0.0-onnx", "the release itself"), ("1.0.0", "not a deployable"),
                     ("1.0.0-tflite-int8", "rejected"), ("1.0.0-tflite", "retired")):
        with pytest.raises(VariantError, match=why):
            resolve(registry, release, [bad], auto=False)


def test_each_device_class_prefers_what_was_measured_on_it(registry: ModelRegistry) -> None:
    _register(registry, "1.0.0", ArtifactFormat.WEIGHTS, parent=None)
    _register(registry, "1.0.0-onnx", ArtifactFormat.ONNX, p50=0.05)
    _register(registry, "1.0.0-torchscript", ArtifactFormat.TORCHSCRIPT, p50=0.03)
    _register(registry, "1.0.0-tflite", ArtifactFormat.TFLITE, p50=0.04)
    for version, device_class, p50 in (("1.0.0-onnx", "aarch64/4cpu", 0.9),
                                       ("1.0.0-tflite", "aarch64/4cpu", 0.2),
                                       ("1.0.0-onnx", "x86_64/8cpu", 0.1),
                                       ("1.0.0-torchscript", "x86_64/8cpu", 0.3)):
        registry.add_metrics("m", version, "fleet-benchmark", {"latency_ms_p50": p50},
                             device_class=device_class)
    registry.add_metrics("m", "1.0.0-torchscript", "benchmark", {"latency_ms_p50": 0.05},
                         device_class="x86_64/2cpu")
    builds = resolve(registry, registry.get("m", "1.0.0-onnx"), [], auto=True)
    assert [v.version for v in builds.variants] == ["1.0.0-torchscript", "1.0.0-tflite"]
    assert builds.prefer == {
        # measured first, fastest first; the builds without figures after, in manifest order
        "aarch64/4cpu": ["1.0.0-tflite", "1.0.0-onnx", "1.0.0-torchscript"],
        "x86_64/8cpu": ["1.0.0-onnx", "1.0.0-torchscript", "1.0.0-tflite"],
        "x86_64/2cpu": ["1.0.0-torchscript", "1.0.0-onnx", "1.0.0-tflite"],
    }
