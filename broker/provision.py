"""Broker initialisation and identities: config files, passwords, certificates."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from broker.config import (
    OBSERVER_TOPICS,
    render_acl,
    render_config,
    render_observer_acl,
)
from broker.device_identity import DeviceKeyFiles, IdentityAuthority
from broker.errors import CredentialError
from broker.launcher import pid_is_mosquitto
from broker.passwords import PasswordFile, generate_password, write_private
from broker.pki import CertPair, DevCA
from broker.settings import BrokerSettings
from schemas.topics import validate_id

logger = logging.getLogger(__name__)

RESERVED_PREFIX = "edgefl-"
"""Service identities and client ids (``edgefl-cloud-<instance>``); never a device id."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An MQTT identity: username, password file, TLS certificate, identity key.

    The identity key and its certificate are a device's (secure aggregation).
    """

    username: str
    password_file: Path
    cert: CertPair | None = None
    identity_key: DeviceKeyFiles | None = None

    def password(self) -> str:
        """Read the password from its 0600 file."""
        return self.password_file.read_text().strip()


def write_config_files(settings: BrokerSettings, *, log_to_file: bool = False) -> Path:
    """(Re)render ``mosquitto.conf`` and the ACL; returns the config path."""
    layout = settings.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    if settings.persistence:
        layout.persistence.mkdir(parents=True, exist_ok=True)
    layout.acl.write_text(render_acl(settings.topic_root, settings.cloud_username))
    layout.observer_acl.write_text(render_observer_acl(settings.topic_root, observers(settings)))
    layout.config.write_text(render_config(settings, log_to_file=log_to_file))
    for path in (layout.passwd, layout.service_passwd, layout.observer_passwd):
        if not path.exists():
            PasswordFile(path).save()
    return layout.config


def observers(settings: BrokerSettings) -> dict[str, list[str]]:
    """Observer name -> the topic groups it reads."""
    path = settings.layout.observers
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {str(k): [str(g) for g in v] for k, v in data.items()}


def add_observer(settings: BrokerSettings, name: str, groups: list[str]) -> Identity:
    """An identity that reads ``groups`` (see OBSERVER_TOPICS) on the observer listener.

    Raises:
        CredentialError: the name is taken by the cloud or by a device.
        ValueError: an unknown topic group.
    """
    validate_id(name, "observer name")
    unknown = sorted(set(groups) - set(OBSERVER_TOPICS))
    if unknown or not groups:
        raise ValueError(f"topic groups {unknown or groups} unknown; choose among "
                         f"{', '.join(OBSERVER_TOPICS)}")
    layout = settings.layout
    if name == settings.cloud_username or name in PasswordFile(layout.passwd):
        raise CredentialError(name, "already an identity of the cloud or of a device")
    layout.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    passwd = PasswordFile(layout.observer_passwd)
    secret = layout.secret_file(name)
    if not (secret.exists() and name in passwd):
        password = generate_password()
        write_private(secret, password + "\n")
        passwd.set(name, password)
        passwd.save()
    known = observers(settings)
    known[name] = sorted(set(groups))
    write_private(layout.observers, json.dumps(known, indent=1) + "\n")
    layout.observer_acl.write_text(render_observer_acl(settings.topic_root, known))
    return Identity(name, secret)


def init_broker(settings: BrokerSettings, *, log_to_file: bool = False) -> Identity:
    """Create the data folder, CA (with TLS), cloud identity, ACL and config.

    Idempotent: existing secrets and certificates are kept.

    Returns:
        The cloud service's identity.
    """
    layout = settings.layout
    layout.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.tls.enabled:
        # Two CAs: the devices' and the services'. The service listener trusts only the
        # second, so a device's certificate cannot connect where the cloud does.
        for folder, name in ((layout.pki, "edgefl development CA"),
                             (layout.service_pki, "edgefl services CA")):
            ca = DevCA(folder)
            ca.create(name)
            if not (folder / "server.crt").exists():
                ca.issue_server(settings.server_hostnames)
            if not ca.crl_path.exists():  # the TLS listeners read it (empty at first)
                ca.write_crl()
    IdentityAuthority(layout.secrets).ensure()
    cloud = add_identity(settings, settings.cloud_username, tls=settings.tls.enabled,
                         allow_cloud=True)
    write_config_files(settings, log_to_file=log_to_file)
    logger.info("broker data folder ready: %s", layout.root)
    return cloud


def add_identity(
    settings: BrokerSettings,
    username: str,
    *,
    password: str | None = None,
    tls: bool = False,
    allow_cloud: bool = False,
) -> Identity:
    """Create (or keep) the password entry of ``username``, and a client cert with ``tls``.

    Args:
        settings: broker settings (for the data folder).
        username: device id or the cloud user.
        password: a chosen password; by default an existing one is kept, or a random
            one generated. Never logged.
        tls: also issue a client certificate (CN = username) from the dev CA (the
            services' CA for the cloud).
        allow_cloud: a service identity (the cloud): its entry goes to the service
            listener's password file (only :func:`init_broker` does this).

    Raises:
        CredentialError: the cloud's username was used for a device.
    """
    validate_id(username, "device id")
    if username == settings.cloud_username and not allow_cloud:
        raise CredentialError(username, "reserved for the cloud service")
    if username.startswith(RESERVED_PREFIX) and not allow_cloud:
        raise CredentialError(username, f"ids starting with {RESERVED_PREFIX!r} are reserved "
                              "for services (their client ids)")
    layout = settings.layout
    secret = layout.secret_file(username)
    passwd = PasswordFile(layout.service_passwd if allow_cloud else layout.passwd)
    if password is None and secret.exists() and username in passwd:
        password = secret.read_text().strip()
        if not passwd.check(username, password):
            raise CredentialError(username, f"{secret} does not match the password file")
    else:
        password = password or generate_password()
        write_private(secret, password + "\n")
        passwd.set(username, password)
        passwd.save()
        logger.info("password entry written for %s (secret in %s)", username, secret)
    cert = None
    if tls:
        folder = layout.service_pki if allow_cloud else layout.pki
        ca = DevCA(folder)
        existing = CertPair(folder / "clients" / f"{username}.crt",
                            folder / "clients" / f"{username}.key")
        cert = existing if existing.cert.exists() else ca.issue_client(username)
    keys = None if allow_cloud else IdentityAuthority(layout.secrets).issue(username)
    return Identity(username, secret, cert, keys)


def add_identities(settings: BrokerSettings, usernames: list[str], *, tls: bool = False,
                   ) -> list[Identity]:
    """Provision many devices at once: the password file is read and written once.

    Existing identities keep their passwords. Every id is checked before anything
    is written, so a bad id in the list changes nothing.

    Raises:
        CredentialError, InvalidIdError: one of the ids cannot be a device.
    """
    for username in usernames:
        validate_id(username, "device id")
        if username == settings.cloud_username or username.startswith(RESERVED_PREFIX):
            raise CredentialError(username, "reserved for services")
    layout = settings.layout
    layout.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    passwd = PasswordFile(layout.passwd)
    identities = []
    changed = False
    for username in usernames:
        secret = layout.secret_file(username)
        if secret.exists() and username in passwd \
                and passwd.check(username, secret.read_text().strip()):
            identities.append(Identity(username, secret))
            continue
        password = generate_password()
        write_private(secret, password + "\n")
        passwd.set(username, password)
        changed = True
        identities.append(Identity(username, secret))
    if changed:
        passwd.save()
    authority = IdentityAuthority(layout.secrets)
    identities = [Identity(i.username, i.password_file, i.cert, authority.issue(i.username))
                  for i in identities]
    logger.info("%d device(s) provisioned", len(usernames))
    if tls:
        ca = DevCA(layout.pki)
        identities = [Identity(i.username, i.password_file, ca.issue_client(i.username),
                               i.identity_key) for i in identities]
    return identities


def parse_id_range(text: str) -> list[str]:
    """``sim-000..sim-099`` -> ``sim-000``, ..., ``sim-099`` (same prefix and width).

    Raises:
        ValueError: not ``PREFIXnnn..PREFIXmmm`` with the same prefix and digit count.
    """
    match = re.fullmatch(r"([A-Za-z0-9_-]*?)(\d+)\.\.([A-Za-z0-9_-]*?)(\d+)", text)
    if match is None or match.group(1) != match.group(3) \
            or len(match.group(2)) != len(match.group(4)):
        raise ValueError(f"{text!r}: expected a range like sim-000..sim-099 (same prefix and "
                         "number of digits)")
    prefix, first, last = match.group(1), int(match.group(2)), int(match.group(4))
    if last < first or last - first >= 100_000:
        raise ValueError(f"{text!r}: the range must go up, at most 100,000 ids")
    width = len(match.group(2))
    return [f"{prefix}{i:0{width}d}" for i in range(first, last + 1)]


def remove_identity(settings: BrokerSettings, username: str) -> bool:
    """Remove a device's password entry and secret; returns whether it existed."""
    layout = settings.layout
    existed = False
    for path in (layout.passwd, layout.service_passwd, layout.observer_passwd):
        passwd = PasswordFile(path)
        existed = passwd.remove(username) or existed
        passwd.save()
    known = observers(settings)
    if known.pop(username, None) is not None:
        write_private(layout.observers, json.dumps(known, indent=1) + "\n")
        layout.observer_acl.write_text(render_observer_acl(settings.topic_root, known))
    layout.secret_file(username).unlink(missing_ok=True)
    existed = IdentityAuthority(layout.secrets).remove(username) or existed
    ca = DevCA(layout.pki)
    if ca.exists() and ca.revoke(username) is not None:
        existed = True
        logger.info("%s: certificate revoked (%s)", username, ca.crl_path)
    for suffix in (".crt", ".key"):  # the CA's copy of a client certificate and its key
        path = layout.pki / "clients" / f"{username}{suffix}"
        existed = path.exists() or existed
        path.unlink(missing_ok=True)
    return existed


def reload_running_broker(settings: BrokerSettings) -> bool:
    """Ask a broker started by :mod:`broker.launcher` to re-read password and ACL files.

    Returns:
        Whether a running broker was signalled (SIGHUP).
    """
    pid_file = settings.layout.root / "mosquitto.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        if not pid_is_mosquitto(pid):
            return False
        os.kill(pid, signal.SIGHUP)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    return True


LAUNCHER_PID = "launcher.pid"
"""Written by ``edgefl broker`` (the process that runs Mosquitto in the foreground)."""


def restart_running_broker(settings: BrokerSettings) -> bool:
    """Ask the ``edgefl broker`` launcher to restart Mosquitto (SIGUSR1).

    Measured with Mosquitto 2.0.11: after a SIGHUP a new connection with a revoked
    certificate fails, but an open TLS session stays connected; a restart closes it
    (every client reconnects; sessions and retained messages are persisted) and the
    revoked certificate is refused from then on.

    Returns:
        Whether a launcher was signalled.
    """
    pid_file = settings.layout.root / LAUNCHER_PID
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"broker" not in handle.read():
                return False
        os.kill(pid, signal.SIGUSR1)
    except (ValueError, OSError):
        return False
    return True
