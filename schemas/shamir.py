"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1).

The building block of secure aggregation (Bonawitz et al. 2017): a device shares
its self-mask seed and its mask key among the round's devices, so that any ``t`` of
them can rebuild what a dropped device would have removed, while ``t - 1`` learn
nothing (every secret is equally consistent with ``t - 1`` shares). Written here
because no maintained library of the field offers it for arbitrary byte strings;
it is small, and ``tests/test_shamir.py`` checks it against the defining formulas.

A secret is up to 64 bytes (an X25519 private key or a 32-byte seed fit), read as a
big-endian integer below the Mersenne prime ``P = 2^521 - 1``. The polynomial's
coefficients come from :mod:`secrets`. Share ``i`` is ``(i, f(i))`` for
``i = 1..n``, serialized as 2 bytes of ``i`` and 66 bytes of ``f(i)``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

P = (1 << 521) - 1
"""The field's prime (a Mersenne prime: 2^521 - 1)."""
MAX_SECRET_BYTES = 64
MAX_SHARES = 65_535
Y_BYTES = 66
SHARE_BYTES = 2 + Y_BYTES


class ShamirError(ValueError):
    """Bad parameters, or shares that cannot rebuild a secret."""


@dataclass(frozen=True, slots=True)
class Share:
    """One point ``(x, f(x))`` of the sharing polynomial."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """2 bytes of ``x``, 66 of ``y`` (big-endian)."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """The share of :meth:`to_bytes`.

        Raises:
            ShamirError: wrong length, ``x`` zero, or ``y`` outside the field.
        """
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
        if x == 0 or y >= P:
            raise ShamirError("share out of range")
        return cls(x, y)


def split(secret: bytes, threshold: int, count: int) -> list[Share]:
    """``count`` shares of ``secret``, any ``threshold`` of which rebuild it.

    Raises:
        ShamirError: ``1 <= threshold <= count <= 65535`` does not hold, or the
            secret is longer than 64 bytes.
    """
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise ShamirError(f"need 1 <= threshold ({threshold}) <= count ({count}) <= "
                          f"{MAX_SHARES}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secrets are at most {MAX_SECRET_BYTES} bytes")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(P)
                                                      for _ in range(threshold - 1)]
    return [Share(x, evaluate(coefficients, x)) for x in range(1, count + 1)]


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """``f(x) mod P`` for ``f = c0 + c1 x + ...`` (Horner)."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % P
    return value


def interpolate(shares: Sequence[Share], x: int) -> int:
    """``f(x)`` of the polynomial of degree ``len(shares) - 1`` through ``shares`` (Lagrange).

    Raises:
        ShamirError: no shares, or repeated ``x``.
    """
    if not shares:
        raise ShamirError("no shares")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError("shares repeat an x")
    value = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, other in enumerate(shares):
            if i != j:
                numerator = numerator * (x - other.x) % P
                denominator = denominator * (share.x - other.x) % P
        value = (value + share.y * numerator * pow(denominator, -1, P)) % P
    return value


def combine(shares: Sequence[Share], length: int) -> bytes:
    """The secret of ``length`` bytes from at least ``threshold`` distinct shares.

    With fewer than the threshold the result is a field element unrelated to the
    secret (this cannot be detected: that is the point of the scheme).

    Raises:
        ShamirError: no shares, repeated ``x``, or a result longer than ``length``.
    """
    secret = interpolate(shares, 0)
    if secret >= 1 << (8 * length):
        raise ShamirError("the shares do not rebuild a secret of that length")
    return secret.to_bytes(length, "big")


def consistent(shares: Sequence[Share], threshold: int) -> bool:
    """Whether every share lies on the polynomial the first ``threshold`` define.

    A share altered in transit or by a dishonest holder shows up when there are more.
    """
    base = list(shares[:threshold])
    return all(interpolate(base, s.x) == s.y for s in shares[threshold:])
