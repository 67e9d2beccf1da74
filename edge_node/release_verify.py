"""Is a release genuine? Ed25519 signature over the manifest, against trusted keys."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.errors import InstallError
from schemas.release import ReleaseManifest


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or base64 of its 32 raw bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None
    return Ed25519PublicKey.from_public_bytes(raw)


def load_trusted_keys(config: dict[str, str], files: dict[str, Path] | None = None,
                      ) -> dict[str, Ed25519PublicKey]:
    """key_id -> public key, from settings: keys given inline, and keys read from files.

    Raises:
        ValueError: a key that is not an Ed25519 public key, or a file that cannot be read
            (naming it).
    """
    keys = {key_id: load_public_key(text) for key_id, text in config.items()}
    for key_id, path in (files or {}).items():
        try:
            keys[key_id] = load_public_key(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"trusted key file {path} for {key_id!r}: {exc}") from None
    return keys


def verify_manifest(manifest: ReleaseManifest, keys: dict[str, Ed25519PublicKey]) -> None:
    """Raise InstallError unless a trusted key signed exactly this manifest."""
    if manifest.signature is None:
        raise InstallError("unsigned", "the manifest carries no signature")
    key = keys.get(manifest.key_id)
    if key is None:
        raise InstallError("untrusted_key", f"key {manifest.key_id!r} is not trusted here")
    try:
        key.verify(base64.b64decode(manifest.signature), manifest.signing_bytes())
    except InvalidSignature:
        raise InstallError("bad_signature", "Ed25519 signature does not verify") from None
