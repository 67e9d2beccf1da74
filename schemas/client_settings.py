"""MQTT client settings shared by the edge agent and the cloud service."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_core import PydanticCustomError


def _lenient_models(annotation: object) -> list[type[BaseModel]]:
    """The model classes in ``annotation`` (through Optional/Union/Annotated) that allow extras."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _lenient_models(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _lenient_models(arg)]
    if (isinstance(annotation, type) and issubclass(annotation, BaseModel)
            and annotation.model_config.get("extra") != "forbid"):
        return [annotation]
    return []


def _known_keys(model: type[BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias is not None:
            keys.add(field.alias)
        if isinstance(field.validation_alias, str):
            keys.add(field.validation_alias)
    return keys


def _unknown_keys(model: type[BaseModel], value: Mapping[Any, Any], path: str) -> list[str]:
    """Dotted paths of the keys of ``value`` (and of its nested models) ``model`` ignores."""
    known = _known_keys(model)
    unknown = [f"{path}.{key}" for key in value if str(key) not in known]
    for name, field in model.model_fields.items():
        nested = value.get(name, value.get(field.alias) if field.alias else None)
        if isinstance(nested, Mapping):
            for inner in _lenient_models(field.annotation):
                unknown += _unknown_keys(inner, nested, f"{path}.{name}")
    return unknown


class SettingsSection(BaseModel):
    """A section of a settings file: an unknown key (a typo) is an error, never ignored.

    Fields typed with a wire model (which ignores unknown keys on purpose, for forward
    compatibility on the wire) are held to the same rule here: a settings file is
    written by an operator, and a key that would be dropped is a typo.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys_in_wire_models(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        unknown: list[str] = []
        for name, field in cls.model_fields.items():
            value = data.get(name, data.get(field.alias) if field.alias else None)
            if isinstance(value, Mapping):
                for model in _lenient_models(field.annotation):
                    unknown += _unknown_keys(model, value, name)
        if unknown:
            raise PydanticCustomError(
                "extra_forbidden",
                "Extra inputs are not permitted in {section}: {keys}",
                {"section": cls.__name__, "keys": ", ".join(sorted(unknown))},
            )
        return data


class TlsClientSettings(SettingsSection):
    """Client side of TLS; with cert and key it is mTLS (the CN is the identity)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttClientSettings(SettingsSection):
    """Where and how a client connects."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal[5, 4] = Field(default=5, description="5 = MQTT 5, 4 = MQTT 3.1.1")
    password: SecretStr | None = None
    password_file: Path | None = Field(default=None, description="File holding the password")
    tls: TlsClientSettings | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0

    def resolved_password(self) -> str | None:
        """The password from settings or its file (never logged)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return None
