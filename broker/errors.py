"""Typed errors of the broker package."""

from __future__ import annotations

INSTALL_HINT = (
    "Mosquitto is not installed. On Debian/Ubuntu: `sudo apt-get install mosquitto` "
    "(on macOS: `brew install mosquitto`); `make test` installs it when run as root."
)


class BrokerError(Exception):
    """Base class of broker errors."""


class MosquittoNotFoundError(BrokerError):
    """No ``mosquitto`` executable was found."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


class BrokerStartError(BrokerError):
    """The broker process exited or did not accept connections in time."""

    def __init__(self, why: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        message = f"broker did not start: {why}"
        if log_tail:
            message += f"\n--- broker log ---\n{log_tail}"
        super().__init__(message)


class ConfigError(BrokerError):
    """A broker setting cannot be rendered safely (e.g. a newline in a path)."""

    def __init__(self, setting: str, why: str) -> None:
        super().__init__(f"invalid broker setting {setting}: {why}")


class CredentialError(BrokerError):
    """A credential cannot be created or read."""

    def __init__(self, who: str, why: str) -> None:
        super().__init__(f"credentials for {who!r}: {why}")
