"""Commands on ``devices/{d}/cmd/{name}``, answered on ``.../reply`` with a CommandResult."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import JsonValue, ValidationError

from edge_node.counters import Counters
from edge_node.errors import EdgeError
from schemas.base import decode_message, now
from schemas.device import COMMAND_ARGS, Command, CommandResult, CommandStatus
from schemas.errors import DecodeError

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, JsonValue]]
"""Takes the command's args, returns the result; raises EdgeError/ValueError to fail."""
Reply = Callable[[dict[str, JsonValue] | None, str | None], None]
"""``reply(result, None)`` on success, ``reply(None, error)`` on failure."""
DeferredHandler = Callable[[dict[str, Any], Reply], None]
"""Takes the args and a Reply; returns at once and replies when done."""



class CommandRouter:
    """Dispatches commands to handlers; every command gets an answer."""

    def __init__(self, device_id: str, counters: Counters,
                 send: Callable[[str, CommandResult], None]) -> None:
        self.device_id = device_id
        self.counters = counters
        self._send = send
        self._handlers: dict[str, Handler] = {}
        self._deferred: dict[str, DeferredHandler] = {}

    def register(self, name: str, handler: Handler) -> None:
        """Handle command ``name`` with ``handler`` (runs on the agent thread)."""
        self._handlers[name] = handler

    def register_deferred(self, name: str, handler: DeferredHandler) -> None:
        """Handle ``name`` away from the agent thread, which never waits for it.

        ``handler`` gets the arguments and a ``reply(result, error)`` to call once done.
        """
        self._deferred[name] = handler

    @property
    def names(self) -> list[str]:
        """Commands this device understands."""
        return sorted([*self._handlers, *self._deferred])

    def _bad_args(self, name: str, command: Command) -> str | None:
        """Why ``command.args`` does not fit the command's schema (None when it does)."""
        schema = COMMAND_ARGS.get(name)
        if schema is None:
            return None
        try:
            schema.model_validate(command.args, strict=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            return "invalid args: " + "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in errors[:5])
        return None

    def dispatch(self, name: str, payload: bytes) -> None:
        """Run one command and send its result (now, or later for deferred ones)."""
        deferred = self._deferred.get(name)
        if deferred is not None:
            try:
                command = decode_message(Command, payload)
            except DecodeError as exc:
                self.counters.add(f"command_{exc.reason}")
                self._send(name, self._error("invalid", name, f"invalid command: {exc.detail}"))
                return
            problem = self._bad_args(name, command)
            if problem is not None:
                self.counters.add("command_invalid_args")
                self._send(name, self._error(command.correlation_id, name, problem))
                return
            if command.expires_at is not None and command.expires_at < now():
                self.counters.add("command_expired")
                self._send(name, self._error(command.correlation_id, name,
                                             "command expired before it ran"))
                return

            def reply(result: dict[str, JsonValue] | None, error: str | None) -> None:
                if error is not None:
                    self.counters.add("command_failed")
                    self._send(name, self._error(command.correlation_id, name, error))
                else:
                    self._send(name, CommandResult(
                        correlation_id=command.correlation_id, device_id=self.device_id,
                        command=name, ts=now(), status=CommandStatus.OK, result=result or {}))

            deferred(dict(command.args), reply)
            return
        self._send(name, self.handle(name, payload))

    def handle(self, name: str, payload: bytes) -> CommandResult:
        """Decode, check and run one command; never raises for bad input."""
        try:
            command = decode_message(Command, payload)
        except DecodeError as exc:
            self.counters.add(f"command_{exc.reason}")
            return self._error("invalid", name, f"invalid command: {exc.detail}")
        if command.expires_at is not None and command.expires_at < now():
            self.counters.add("command_expired")
            return self._error(command.correlation_id, name, "command expired before it ran")
        problem = self._bad_args(name, command)
        if problem is not None:
            self.counters.add("command_invalid_args")
            return self._error(command.correlation_id, name, problem)
        handler = self._handlers.get(name)
        if handler is None:
            self.counters.add("command_unknown")
            return self._error(command.correlation_id, name,
                               f"unknown command {name!r}; known: {', '.join(self.names)}")
        try:
            result = handler(dict(command.args))
        except (EdgeError, ValueError, TypeError, KeyError) as exc:
            self.counters.add("command_failed")
            logger.warning("%s: command %s failed: %s", self.device_id, name, exc)
            return self._error(command.correlation_id, name, str(exc) or type(exc).__name__)
        return CommandResult(correlation_id=command.correlation_id, device_id=self.device_id,
                             command=name, ts=now(), status=CommandStatus.OK, result=result)

    def _error(self, correlation_id: str, name: str, message: str) -> CommandResult:
        return CommandResult(correlation_id=correlation_id, device_id=self.device_id,
                             command=name, ts=now(), status=CommandStatus.ERROR,
                             error=message[:1024])
