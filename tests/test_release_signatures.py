"""Release signatures can be checked outside Python: RFC 8785 bytes, a raw Ed25519 key.

An independent implementation verifies them: the npm package ``canonicalize``
and node:crypto (``tests/js/verify_release.cjs``), as a Node-RED flow or any
non-Python consumer would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import rfc8785

from cloud.releases import build_release, public_key_b64
from schemas.base import ModelFormat, decode_message
from schemas.release import ReleaseManifest, ReleaseVariant, Requirements, Targeting
from tests.releases import OTHER_KEY, SIGNING_KEY

REPO = Path(__file__).resolve().parents[1]
JCS_DIR = REPO / ".cache" / "jcs"
VERIFIER = REPO / "tests" / "js" / "verify_release.cjs"


def node_verifies(manifest_json: bytes, public_key: str) -> bool:
    node = shutil.which("node")
    if node is None or not (JCS_DIR / "node_modules" / "canonicalize").exists():
        pytest.fail("node and .cache/jcs are needed: run `make test` (it installs them)")
    result = subprocess.run(
        [node, str(VERIFIER)], input=json.dumps({"manifest": manifest_json.decode(),
                                                 "public_key": public_key}),
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "JCS_DIR": str(JCS_DIR)})
    assert result.stdout.strip() in ("valid", "invalid"), result.stderr
    return result.returncode == 0


def manifest() -> ReleaseManifest:
    built, _ = build_release(
        "digits", "1.2.0", os.urandom(700_000), fmt=ModelFormat.ONNX, key=SIGNING_KEY,
        key_id="release-2026", chunk_size=262_144,
        targeting=Targeting(canary=["pi-07"], min_memory_mb=1.5),
        input_shape=[-1, 64],
        metadata={"task": "digits", "accuracy": 0.9583333333333334, "rounds": 30,
                  "note": "caf\u00e9 \u2013 \U0001f600", "nested": {"b": [1.0, 2.5e-7, 1e21]}})
    return built


def test_node_verifies_a_signed_manifest_as_published() -> None:
    published = manifest().to_json()
    assert node_verifies(published, public_key_b64(SIGNING_KEY))


def test_node_verifies_a_release_with_variants() -> None:
    variant = ReleaseVariant(version="1.2.0-tflite", format=ModelFormat.TFLITE,
                             size_bytes=300_000, sha256="ab" * 32, chunk_size=262_144,
                             chunk_count=2, requirements=Requirements(min_memory_mb=2.5))
    built, _ = build_release("digits", "1.2.0", os.urandom(1000), fmt=ModelFormat.ONNX,
                             key=SIGNING_KEY, key_id="release-2026", variants=[variant],
                             prefer={"aarch64/4cpu": ["1.2.0-tflite", "1.2.0"]})
    assert node_verifies(built.to_json(), public_key_b64(SIGNING_KEY))
    body = json.loads(built.to_json())
    body["prefer"]["aarch64/4cpu"].reverse()
    assert not node_verifies(json.dumps(body).encode(), public_key_b64(SIGNING_KEY))


def test_node_refuses_a_tampered_manifest_or_another_key() -> None:
    body = json.loads(manifest().to_json())
    body["version"] = "1.2.1"
    assert not node_verifies(json.dumps(body).encode(), public_key_b64(SIGNING_KEY))
    assert not node_verifies(manifest().to_json(), public_key_b64(OTHER_KEY))


def test_the_signed_bytes_are_rfc_8785() -> None:
    published = manifest()
    body = json.loads(published.to_json())
    del body["signature"]
    assert published.signing_bytes() == rfc8785.dumps(body)
    decoded = decode_message(ReleaseManifest, published.to_json())  # as a device reads it
    assert decoded.signing_bytes() == published.signing_bytes()
