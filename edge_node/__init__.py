"""edgefl edge agent: MQTT session, telemetry, offline buffer, inference, OTA installs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
