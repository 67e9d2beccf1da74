"""Test-side release tooling: real models, Ed25519 signatures, chunked retained publishing.

Manifests are built and signed by cloud.releases; tests publish them with a
cloud-identity client.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.releases import build_release as cloud_build_release
from cloud.releases import public_key_b64 as cloud_public_key_b64
from schemas.base import ModelFormat
from schemas.release import ReleaseManifest, Targeting
from schemas.topics import Topics
from tests.mqtt_client import SyncClient

KEY_ID = "test-key"
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edgefl tests").digest())
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"not trusted").digest())
DELIVERED = {0x00, 0x10}


def public_key_b64(key: Ed25519PrivateKey = SIGNING_KEY) -> str:
    """Base64 of the raw public key, as in OtaSettings.trusted_keys."""
    return cloud_public_key_b64(key)


def mlp(seed: int) -> torch.nn.Module:
    """A digits-sized MLP (64 -> 32 -> 10) with seeded weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return model.eval()


def export_onnx(model: torch.nn.Module, path: Path) -> bytes:
    """Export to ONNX with a dynamic batch axis; returns the file's bytes."""
    torch.onnx.export(model, (torch.zeros(1, 64),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                      dynamo=False)
    return path.read_bytes()


def export_torchscript(model: torch.nn.Module, path: Path) -> bytes:
    """Script and save; returns the file's bytes."""
    torch.jit.script(model).save(str(path))  # type: ignore[no-untyped-call]
    return path.read_bytes()


def reference(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    """The torch eager output for ``batch``."""
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(batch)).numpy()
    return out


def build_release(
    model: str, version: str, data: bytes, *, fmt: ModelFormat = ModelFormat.ONNX,
    chunk_size: int = 4096, key: Ed25519PrivateKey = SIGNING_KEY, key_id: str = KEY_ID,
    targeting: Targeting | None = None, input_shape: list[int] | None = None,
) -> tuple[ReleaseManifest, list[bytes]]:
    """A signed manifest and the chunks of ``data`` (small chunks: many of them)."""
    return cloud_build_release(model, version, data, fmt=fmt, key=key, key_id=key_id,
                               chunk_size=chunk_size, targeting=targeting,
                               input_shape=input_shape)


def publish_chunks(cloud: SyncClient, topics: Topics, manifest: ReleaseManifest,
                   chunks: list[bytes], indexes: list[int] | None = None) -> None:
    """Publish chunks retained (all, or the given indexes)."""
    for i in indexes if indexes is not None else range(len(chunks)):
        code = cloud.publish(topics.chunk(manifest.model, manifest.version, i), chunks[i],
                             retain=True)
        assert code in DELIVERED, code


def publish_manifest(cloud: SyncClient, topics: Topics, manifest: ReleaseManifest) -> None:
    """Publish the manifest retained."""
    assert cloud.publish(topics.release(manifest.model), manifest.to_json(),
                         retain=True) in DELIVERED


def release(cloud: SyncClient, topics: Topics, manifest: ReleaseManifest,
            chunks: list[bytes]) -> None:
    """Chunks first, then the manifest (what the rollout manager will do)."""
    publish_chunks(cloud, topics, manifest, chunks)
    publish_manifest(cloud, topics, manifest)
