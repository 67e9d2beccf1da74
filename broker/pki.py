"""A development certificate authority for the fleet, built with ``cryptography``.

``edgefl broker init --tls`` creates a CA and a server certificate; ``edgefl broker
add-device ID --tls`` issues a client certificate whose CN is the device id, so
with ``use_identity_as_username`` the broker ACL applies to it unchanged. This is
for development and small fleets; a production fleet plugs in its own CA files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import CredentialError
from broker.passwords import write_private
from schemas.topics import validate_id

CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True, slots=True)
class CertPair:
    """Paths of a certificate and its private key."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_pair(pair: CertPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(pair.key, key_pem)
    pair.cert.parent.mkdir(parents=True, exist_ok=True)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return start, start + dt.timedelta(days=days)


class DevCA:
    """A CA whose files live in one folder (``ca.crt``, ``ca.key``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pair = CertPair(folder / "ca.crt", folder / "ca.key")

    def exists(self) -> bool:
        """Whether the CA files are present."""
        return self.pair.cert.exists() and self.pair.key.exists()

    def create(self, common_name: str = "edgefl development CA") -> CertPair:
        """Create the CA unless it exists."""
        if self.exists():
            return self.pair
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity(CA_DAYS)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_pair(self.pair, cert, key)
        return self.pair

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list the TLS listener reads (``crl.pem``)."""
        return self.folder / "crl.pem"

    def revoked(self) -> list[int]:
        """Serial numbers on the CRL (none when there is no CRL yet)."""
        if not self.crl_path.exists():
            return []
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return [entry.serial_number for entry in crl]

    def write_crl(self, add: list[int] | None = None) -> Path:
        """Sign and write the CRL with every serial revoked so far (and ``add``).

        Its next update is ``CA_DAYS`` away: OpenSSL refuses every certificate once a
        CRL it checks has expired, so a development CRL must not lapse.
        """
        ca_cert, ca_key = self._load()
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=CA_DAYS)))
        for serial in sorted({*self.revoked(), *(add or [])}):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5)).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def revoke(self, identity: str) -> int | None:
        """Put the client certificate of ``identity`` on the CRL; its serial (None: none)."""
        cert_path = self.folder / "clients" / f"{identity}.crt"
        if not cert_path.exists():
            return None
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        self.write_crl([serial])
        return int(serial)

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise CredentialError("CA", f"no CA in {self.folder}; run `edgefl broker init --tls`")
        cert = x509.load_pem_x509_certificate(self.pair.cert.read_bytes())
        key = serialization.load_pem_private_key(self.pair.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialError("CA", "CA key is not an EC key")
        return cert, key

    def _issue(
        self, pair: CertPair, common_name: str, *, server: bool, sans: list[str]
    ) -> CertPair:
        ca_cert, ca_key = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity(LEAF_DAYS)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            names: list[x509.GeneralName] = []
            for san in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    names.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        _write_pair(pair, builder.sign(ca_key, hashes.SHA256()), key)
        return pair

    def issue_server(self, hostnames: list[str]) -> CertPair:
        """Server certificate for the TLS listener, valid for ``hostnames``."""
        pair = CertPair(self.folder / "server.crt", self.folder / "server.key")
        return self._issue(pair, hostnames[0] if hostnames else "localhost", server=True,
                           sans=hostnames)

    def issue_client(self, identity: str) -> CertPair:
        """Client certificate whose CN is ``identity`` (a device id or the cloud user)."""
        validate_id(identity, "identity")
        folder = self.folder / "clients"
        pair = CertPair(folder / f"{identity}.crt", folder / f"{identity}.key")
        return self._issue(pair, identity, server=False, sans=[])
