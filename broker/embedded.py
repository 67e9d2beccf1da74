"""The embedded fallback broker (pure-Python amqtt) for the demo when Mosquitto is absent.

amqtt speaks MQTT 3.1.1 only and has no ACL here: it is for trying edgefl on a
laptop, never for a fleet. Tests always use Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any, Self

from broker.errors import BrokerStartError
from broker.launcher import port_accepts

logger = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt broker running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except (OSError, RuntimeError, ValueError) as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._broker.shutdown())
        loop.close()

    async def _start(self) -> None:
        from amqtt.broker import Broker  # imported here: optional dependency

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        await self._broker.start()

    def start(self, timeout: float = 10.0) -> Self:
        """Start the broker thread and wait (bounded) until it accepts connections."""
        if port_accepts(self.host, self.port):
            raise BrokerStartError(f"{self.host}:{self.port} is already in use")
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerStartError(f"amqtt did not start within {timeout} s")
        if self._error is not None:
            raise BrokerStartError(f"amqtt failed: {self._error}")
        logger.info("embedded amqtt broker listening on %s:%s", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and join its thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
