"""Mosquitto password file: PBKDF2-SHA512 entries in mosquitto_passwd's ``$7$`` format.

Hashes are computed here rather than with ``mosquitto_passwd -b``, which would
put the password in a process argument list visible to every local user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from broker.errors import CredentialError
from schemas.topics import validate_id

ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Mosquitto ``$7$`` hash of ``password``."""
    if not password:
        raise CredentialError("<password>", "empty password")
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, entry: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash."""
    try:
        _, kind, iterations, salt_b64, digest_b64 = entry.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


def generate_password() -> str:
    """A random password with 192 bits of entropy, URL-safe characters."""
    return secrets.token_urlsafe(24)


def write_private(path: Path, data: str | bytes) -> None:
    """Write a secret atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class PasswordFile:
    """Read-modify-write of a Mosquitto password file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path.exists():
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip() or line.startswith("#"):
                    continue
                user, sep, entry = line.partition(":")
                if not sep:
                    raise CredentialError(str(path), f"line {lineno} has no ':'")
                self.entries[user] = entry

    def __contains__(self, username: object) -> bool:
        return username in self.entries

    def set(self, username: str, password: str) -> None:
        """Add or replace ``username``'s entry (not yet written)."""
        validate_id(username, "username")
        self.entries[username] = hash_password(password)

    def remove(self, username: str) -> bool:
        """Drop ``username``; returns whether it existed."""
        return self.entries.pop(username, None) is not None

    def check(self, username: str, password: str) -> bool:
        """Whether the stored entry matches ``password``."""
        entry = self.entries.get(username)
        return entry is not None and verify_password(password, entry)

    def save(self) -> None:
        """Write the file atomically with mode 0600."""
        text = "".join(f"{user}:{entry}\n" for user, entry in sorted(self.entries.items()))
        write_private(self.path, text)
