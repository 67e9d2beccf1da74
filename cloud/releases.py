"""Signed model releases: the release key, manifests and chunks.

The cloud signs every :class:`~schemas.release.ReleaseManifest` with an Ed25519
key; devices trust its public key (``OtaSettings.trusted_keys``) and refuse
anything else. The signature covers ``manifest.signing_bytes()``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.base import ModelFormat, now
from schemas.release import ReleaseManifest, ReleaseVariant, Targeting

DEFAULT_CHUNK_BYTES = 256 * 1024


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a release key and store it as PEM readable by its owner only."""
    key = Ed25519PrivateKey.generate()
    save_signing_key(key, path)
    return key


def save_signing_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Store a release key as PEM readable by its owner only (replacing any file there)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM release key."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 private key")
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The public key as devices configure it: base64 of its 32 raw bytes."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_manifest(manifest: ReleaseManifest, key: Ed25519PrivateKey) -> ReleaseManifest:
    """A copy of ``manifest`` carrying the Ed25519 signature over its signing bytes."""
    signature = base64.b64encode(key.sign(manifest.signing_bytes())).decode()
    return manifest.model_copy(update={"signature": signature})


def build_release(
    model: str,
    version: str,
    data: bytes,
    *,
    fmt: ModelFormat,
    key: Ed25519PrivateKey,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    targeting: Targeting | None = None,
    input_shape: list[int] | None = None,
    metadata: dict[str, object] | None = None,
    variants: list[ReleaseVariant] | None = None,
    prefer: dict[str, list[str]] | None = None,
) -> tuple[ReleaseManifest, list[bytes]]:
    """The signed manifest of a model file and its chunks, ready to publish retained.

    ``variants`` (other builds, their chunks published by the caller) and ``prefer``
    (device class -> builds fastest first) are covered by the signature too.
    """
    count = max(1, math.ceil(len(data) / chunk_size))
    manifest = ReleaseManifest.model_validate({
        "model": model, "version": version, "format": fmt, "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": chunk_size,
        "chunk_count": count, "created_at": now(), "targeting": targeting or Targeting(),
        "key_id": key_id, "input_shape": input_shape, "metadata": metadata or {},
        "variants": variants or [], "prefer": prefer or {},
    })
    chunks = [data[i * chunk_size:(i + 1) * chunk_size] for i in range(count)]
    return sign_manifest(manifest, key), chunks
