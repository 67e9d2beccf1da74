"""Start and stop a real Mosquitto from the rendered configuration.

Used by ``edgefl broker``, the demo and the test fixture, so all three run the
same broker configuration.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from broker.errors import BrokerStartError, MosquittoNotFoundError

logger = logging.getLogger(__name__)

_EXTRA_DIRS = (
    "/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin",
)


def find_mosquitto() -> Path | None:
    """Path of the ``mosquitto`` executable, also looking in sbin folders off PATH."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for folder in _EXTRA_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_version(binary: Path | None = None) -> str | None:
    """Version printed by ``mosquitto -h``, or None when not installed."""
    binary = binary or find_mosquitto()
    if binary is None:
        return None
    out = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=10,
                         check=False)
    match = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else None


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_is_mosquitto(pid: int) -> bool:
    """Whether ``pid`` is a live mosquitto process (Linux /proc check)."""
    try:
        return "mosquitto" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def terminate(proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    """SIGTERM a child process, then SIGKILL it if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s pid %s ignored SIGTERM; killing it", what, proc.pid)
        proc.kill()
        proc.wait(timeout=timeout)


class MosquittoProcess:
    """One Mosquitto child process.

    Args:
        config: path of the rendered ``mosquitto.conf``.
        host: address the plain listener binds (to probe readiness).
        port: plain listener port.
        log_file: file the broker logs to, shown when start-up fails.
        pid_file: where to record the child's PID (for ``add-device`` reloads).
        stdout: where the broker's stdout goes (``None``: inherit, for the CLI).
    """

    def __init__(
        self,
        config: Path,
        host: str,
        port: int,
        *,
        log_file: Path | None = None,
        pid_file: Path | None = None,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        binary: Path | None = None,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoNotFoundError
        self.binary = found
        self.config = config
        self.host = host
        self.port = port
        self.log_file = log_file
        self.pid_file = pid_file
        self._stdout = stdout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running broker."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """Whether the child is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> Self:
        """Start the broker and wait (bounded) until it accepts TCP connections."""
        if port_accepts(self.host, self.port):
            raise BrokerStartError(f"{self.host}:{self.port} is already in use")
        self._proc = subprocess.Popen(
            [str(self.binary), "-c", str(self.config)],
            stdout=self._stdout,
            stderr=subprocess.STDOUT if self._stdout is not None else None,
            start_new_session=self._stdout is not None,
        )
        if self.pid_file:
            self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_accepts(self.host, self.port):
                logger.info("mosquitto pid %s listening on %s:%s", self.pid, self.host, self.port)
                return self
            try:
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise BrokerStartError(f"mosquitto exited with code {code}", self.log_tail())
        self.stop()
        raise BrokerStartError(f"no connection on {self.host}:{self.port} after {timeout} s",
                               self.log_tail())

    def reload(self) -> None:
        """Re-read password and ACL files (SIGHUP)."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGHUP)

    def wait(self) -> int:
        """Block until the broker exits; returns its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        terminate(proc, "mosquitto", timeout)
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the broker log, for error messages."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
