"""The fleet's identity authority and each device's long-term identity key (Ed25519).

In secure aggregation the cloud relays every key a device advertises, so the cloud must
not be able to make a device up, or to swap a device's keys for its own. At provisioning
this module (the broker's admin tool, which the cloud service does not run) gives each
device an Ed25519 identity key and a :class:`schemas.secagg.DeviceIdentity` certifying
it, signed by the authority key. Devices are configured with the authority's public key
and accept a peer's advertised keys only under a certificate it signed.

Files under the broker's secrets folder (0600 for private keys):

- ``identity-authority.pem``: the authority's private key (keep it off the cloud host);
- ``identity-authority.pub``: its public key, base64 of the 32 raw bytes, the value a
  device's ``secagg.authority_key`` setting takes;
- ``identities/{device}.key``: the device's identity key (PEM, PKCS#8), to install on it;
- ``identities/{device}.json``: its certificate.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.passwords import write_private
from schemas.base import decode_message
from schemas.errors import DecodeError
from schemas.secagg import DeviceIdentity, SecAggError, issue_identity, verify_identity

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceKeyFiles:
    """Where one device's identity key and certificate are."""

    key: Path
    certificate: Path


def authority_id(public_key: Ed25519PublicKey) -> str:
    """``fleet-`` and 16 hex digits of the key's SHA-256: a new authority, a new id."""
    return "fleet-" + hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """A device's identity key from its PEM file.

    Raises:
        ValueError: not an Ed25519 private key.
    """
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")  # noqa: TRY004
    return key


class IdentityAuthority:
    """The authority key in a broker's secrets folder, and the identities it issued."""

    def __init__(self, secrets: Path) -> None:
        self.secrets = secrets
        self.private_path = secrets / "identity-authority.pem"
        self.public_path = secrets / "identity-authority.pub"
        self.folder = secrets / "identities"
        self._key: Ed25519PrivateKey | None = None

    def ensure(self) -> None:
        """Create the authority key once; an existing one is kept."""
        if self.private_path.exists():
            return
        key = Ed25519PrivateKey.generate()
        write_private(self.private_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.public_path.write_text(self.public_b64(key.public_key()) + "\n")
        logger.info("identity authority %s created in %s", authority_id(key.public_key()),
                    self.private_path)

    def key(self) -> Ed25519PrivateKey:
        """The authority's private key (created on first use)."""
        if self._key is None:
            self.ensure()
            self._key = load_identity_key(self.private_path)
        return self._key

    @staticmethod
    def public_b64(public_key: Ed25519PublicKey) -> str:
        """Base64 of the 32 raw bytes (the form devices are configured with)."""
        return base64.b64encode(public_key.public_bytes_raw()).decode()

    def files(self, device_id: str) -> DeviceKeyFiles:
        """Where ``device_id``'s key and certificate are (or will be)."""
        return DeviceKeyFiles(self.folder / f"{device_id}.key", self.folder / f"{device_id}.json")

    def issue(self, device_id: str) -> DeviceKeyFiles:
        """Give ``device_id`` an identity key and its certificate; a valid pair is kept.

        A certificate that does not verify under this authority (another authority's, or
        a damaged file) is replaced with a new key.
        """
        files = self.files(device_id)
        authority = self.key()
        if files.key.exists() and files.certificate.exists():
            try:
                existing = decode_message(DeviceIdentity, files.certificate.read_bytes())
                certified = verify_identity(existing, authority.public_key())
                if existing.device_id == device_id and certified.public_bytes_raw() == \
                        load_identity_key(files.key).public_key().public_bytes_raw():
                    return files
            except (DecodeError, SecAggError, ValueError) as exc:
                logger.warning("%s: identity not kept (%s); issuing a new one", device_id, exc)
        key = Ed25519PrivateKey.generate()
        certificate = issue_identity(authority, authority_id(authority.public_key()),
                                     device_id, key.public_key(), time.time())
        write_private(files.key, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        write_private(files.certificate, certificate.to_json())
        return files

    def remove(self, device_id: str) -> bool:
        """Delete the device's key and certificate; returns whether they existed."""
        files = self.files(device_id)
        existed = files.key.exists() or files.certificate.exists()
        files.key.unlink(missing_ok=True)
        files.certificate.unlink(missing_ok=True)
        return existed
