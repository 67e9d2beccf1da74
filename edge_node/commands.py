"""Commands on ``devices/{d}/cmd/{name}``, answered on ``.../reply`` with a CommandResult."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import JsonValue

from edge_node.errors import EdgeError
from schemas.base import decode_message, now
from schemas.device import Command, CommandResult, CommandStatus
from schemas.errors import DecodeError

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, JsonValue]]
"""Takes the command's args, returns the result; raises EdgeError/ValueError to fail."""


class CommandRouter:
    """Dispatches commands to handlers; every command gets an answer."""

    def __init__(self, device_id: str, counters: Counter[str]) -> None:
        self.device_id = device_id
        self.counters = counters
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        """Handle command ``name`` with ``handler``."""
        self._handlers[name] = handler

    @property
    def names(self) -> list[str]:
        """Commands this device understands."""
        return sorted(self._handlers)

    def handle(self, name: str, payload: bytes) -> CommandResult:
        """Decode, check and run one command; never raises for bad input."""
        try:
            command = decode_message(Command, payload)
        except DecodeError as exc:
            self.counters[f"command_{exc.reason}"] += 1
            return self._error("invalid", name, f"invalid command: {exc.detail}")
        if command.expires_at is not None and command.expires_at < now():
            self.counters["command_expired"] += 1
            return self._error(command.correlation_id, name, "command expired before it ran")
        handler = self._handlers.get(name)
        if handler is None:
            self.counters["command_unknown"] += 1
            return self._error(command.correlation_id, name,
                               f"unknown command {name!r}; known: {', '.join(self.names)}")
        try:
            result = handler(dict(command.args))
        except (EdgeError, ValueError, TypeError, KeyError) as exc:
            self.counters["command_failed"] += 1
            logger.warning("%s: command %s failed: %s", self.device_id, name, exc)
            return self._error(command.correlation_id, name, str(exc) or type(exc).__name__)
        return CommandResult(correlation_id=command.correlation_id, device_id=self.device_id,
                             command=name, ts=now(), status=CommandStatus.OK, result=result)

    def _error(self, correlation_id: str, name: str, message: str) -> CommandResult:
        return CommandResult(correlation_id=correlation_id, device_id=self.device_id,
                             command=name, ts=now(), status=CommandStatus.ERROR,
                             error=message[:1024])
