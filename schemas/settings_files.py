"""Settings from a file (TOML, YAML or JSON) under environment variables.

Every process builds one settings object at start-up; priority, highest first:
explicit values (command-line options), ``EDGEFL_*`` environment variables,
the optional config file, defaults. Shared by EdgeSettings and CloudSettings.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from schemas.errors import SchemaError

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("edgefl_config_file", default=None)


class ConfigFileError(SchemaError):
    """A settings file cannot be read or parsed."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"config file {path}: {why}")


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(path, exc.strerror or str(exc)) from None
    try:
        if path.suffix == ".toml":
            data: object = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigFileError(path, "use a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigFileError(path, str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigFileError(path, "top level must be a mapping")
    return data


class _FileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class FileSettings(BaseSettings):
    """BaseSettings that can also read one config file, below the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values, then environment, then the config file."""
        path = _CONFIG_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(_FileSource(settings_cls, read_config_file(path)))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **explicit: Any) -> Self:
        """Build the settings from ``explicit`` values, the environment and ``config_file``.

        ``None`` values in ``explicit`` are ignored, so unset CLI options fall through.
        """
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**{k: v for k, v in explicit.items() if v is not None})
        finally:
            _CONFIG_FILE.reset(token)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: it all exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def remove_made(leaf: Path, outermost: Path) -> None:
    """Undo a failed start: remove ``leaf``, then its empty parents up to ``outermost``.

    ``leaf`` is this process's own folder, which it made.

    A parent that is not empty is kept: another process (a second agent starting in the
    same layout) may have put its own folder there meanwhile.

    Raises:
        OSError: ``leaf`` could not be removed.
    """
    if leaf.is_dir() and not leaf.is_symlink():
        shutil.rmtree(leaf)
    folder = leaf.parent
    while folder == outermost or outermost in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (in use by another process) or already gone
            return
        folder = folder.parent
