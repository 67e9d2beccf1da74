"""Alert rules: the pydantic models, and loading them from YAML.

A rules file is a mapping with one key, ``rules``, holding a list of rules;
each rule has a ``kind``:

* ``threshold``: a numeric field of :class:`~schemas.device.DeviceTelemetry`
  (``source: telemetry``, the computed ``error_rate_percent`` included) or of
  :class:`~schemas.device.ModelMetrics` (``source: model_metrics``) compared
  with ``threshold`` by ``op``; optionally held for ``for_s`` seconds (message
  timestamps) or ``for_samples`` consecutive samples before the alert opens,
  and resolved only once the value is on the good side of ``clear_threshold``
  (hysteresis).
* ``absence``: a device that reported before has sent no telemetry for
  ``intervals`` times its own declared ``interval_s`` (and at least
  ``min_silence_s``).

Every rule is validated when the file is loaded; a problem raises
:class:`~cloud.alerts.errors.RuleError` naming the file, the rule and the problem.

Example:
    >>> rules = parse_rules('''
    ... rules:
    ...   - name: cpu_high
    ...     kind: threshold
    ...     source: telemetry
    ...     field: cpu_percent
    ...     op: ">"
    ...     threshold: 90
    ...     clear_threshold: 80
    ...     for_s: 60
    ...     severity: major
    ... ''', "example.yaml")
    >>> rules[0].metric, rules[0].clears(85.0), rules[0].clears(80.0)
    ('telemetry.cpu_percent', False, True)
"""

from __future__ import annotations

import logging
import operator
import string
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from cloud.alerts.errors import RuleError
from schemas.base import Id, Severity
from schemas.device import DeviceTelemetry, ModelMetrics

logger = logging.getLogger(__name__)

DEFAULT_RULES_RESOURCE: Final = "default_rules.yaml"
"""Name of the packaged default rules file, next to this module."""

Source = Literal["telemetry", "model_metrics"]
Op = Literal[">", ">=", "<", "<="]

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
_NOT_METRICS: Final = frozenset({"schema_version", "seq", "ts"})
"""Numeric fields that are bookkeeping, not measurements."""

THRESHOLD_PLACEHOLDERS: Final = frozenset(
    {"device_id", "value", "threshold", "field", "model", "version", "op", "rule", "metric",
     "severity"}
)
"""Names a threshold rule's ``message`` template may use."""
ABSENCE_PLACEHOLDERS: Final = frozenset(
    {"device_id", "value", "threshold", "intervals", "interval_s", "rule", "severity"}
)
"""Names an absence rule's ``message`` template may use (``value``: silence, s;
``threshold``: the silence limit, s)."""


def _is_number(annotation: object) -> bool:
    """True for ``int``/``float`` (or an optional/annotated one), never ``bool``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_number(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_number(a) for a in args)
    return annotation in (int, float)


def numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields (computed ones included) of ``model`` that a threshold rule may watch."""
    names = {n for n, f in model.model_fields.items() if _is_number(f.annotation)}
    names |= {n for n, c in model.model_computed_fields.items() if _is_number(c.return_type)}
    return frozenset(names - _NOT_METRICS)


SOURCE_FIELDS: Final[dict[str, frozenset[str]]] = {
    "telemetry": numeric_fields(DeviceTelemetry),
    "model_metrics": numeric_fields(ModelMetrics),
}
"""Watchable fields per ``source``."""


def _check_template(template: str, allowed: frozenset[str], sample: Mapping[str, object]) -> None:
    """Refuse unknown placeholders or format specs that do not fit the values."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in allowed:
            known = ", ".join(sorted(allowed))
            raise ValueError(f"message placeholder {{{name}}} is unknown; use {known}")
    try:
        template.format_map(sample)
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ValueError(f"message template cannot be rendered: {exc}") from None


class _RuleBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: Id = Field(description="Rule name, the last level of `alerts/{device_id}/{rule}`")
    severity: Severity
    message: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None, description="str.format template; a default text when unset"
    )
    description: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Free text for operators; not published"
    )


class ThresholdRule(_RuleBase):
    """A numeric field compared with a threshold, with an optional hold time and hysteresis."""

    kind: Literal["threshold"]
    source: Source
    field: str = Field(description="Numeric field of the source message")
    op: Op
    threshold: float
    clear_threshold: float | None = Field(
        default=None,
        description="Resolve only once the value is on the good side of this (defaults to "
        "threshold); for `>`/`>=` it must be <= threshold, for `<`/`<=` >= threshold",
    )
    for_s: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="The breach must hold this long (message time) to open"
    )
    for_samples: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="The breach must hold for this many consecutive samples"
    )
    models: tuple[Id, ...] | None = Field(
        default=None, description="Only these models (model_metrics rules only)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        fields = SOURCE_FIELDS[self.source]
        if self.field not in fields:
            raise ValueError(
                f"unknown field {self.field!r} for source {self.source}; numeric fields are "
                + ", ".join(sorted(fields))
            )
        if self.for_s is not None and self.for_samples is not None:
            raise ValueError("give for_s or for_samples, not both")
        if self.models is not None and self.source != "model_metrics":
            raise ValueError("models filters model_metrics rules only")
        clear = self.clear_at
        upper = self.op in (">", ">=")
        if (clear > self.threshold) if upper else (clear < self.threshold):
            side = "<=" if upper else ">="
            raise ValueError(f"clear_threshold {clear:g} must be {side} threshold "
                             f"{self.threshold:g} for op {self.op}")
        if self.message is not None:
            _check_template(self.message, THRESHOLD_PLACEHOLDERS, self.render_values(
                device_id="device", value=1.0, model="model", version="1"))
        return self

    @property
    def metric(self) -> str:
        """What the alert names as its metric, e.g. ``telemetry.cpu_percent``."""
        return f"{self.source}.{self.field}"

    @property
    def clear_at(self) -> float:
        """The clear threshold in force (``threshold`` when unset)."""
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    def breaches(self, value: float) -> bool:
        """True when ``value`` is on the bad side of the threshold."""
        return _OPS[self.op](value, self.threshold)

    def clears(self, value: float) -> bool:
        """True when ``value`` is on the good side of the clear threshold."""
        return not _OPS[self.op](value, self.clear_at)

    def applies_to(self, model: str) -> bool:
        """True when this (model_metrics) rule watches ``model``."""
        return self.models is None or model in self.models

    def render_values(self, *, device_id: str, value: float, model: str | None,
                      version: str | None) -> dict[str, object]:
        """The values a message template is formatted with."""
        return {
            "device_id": device_id, "value": value, "threshold": self.threshold,
            "field": self.field, "model": model or "", "version": version or "",
            "op": self.op, "rule": self.name, "metric": self.metric,
            "severity": self.severity.value,
        }

    def render(self, *, device_id: str, value: float, model: str | None = None,
               version: str | None = None) -> str:
        """The alert message for one breach."""
        values = self.render_values(device_id=device_id, value=value, model=model,
                                    version=version)
        if self.message is not None:
            return self.message.format_map(values)
        text = "{metric} = {value:.4g} ({op} {threshold:g}) on {device_id}"
        if model is not None:
            text = "model {model} {version}: " + text
        return text.format_map(values)


class AbsenceRule(_RuleBase):
    """No telemetry from a device for ``intervals`` x its declared ``interval_s``."""

    kind: Literal["absence"]
    intervals: Annotated[float, Field(gt=0)] = Field(
        default=3.0, description="Silence limit in reporting intervals"
    )
    min_silence_s: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="Silence limit floor, s (for devices reporting very often)"
    )

    @model_validator(mode="after")
    def _template(self) -> Self:
        if self.message is not None:
            _check_template(self.message, ABSENCE_PLACEHOLDERS, self.render_values(
                device_id="device", silence_s=1.0, interval_s=1.0))
        return self

    @property
    def metric(self) -> str:
        """What the alert names as its metric."""
        return "telemetry.silence_s"

    def limit_s(self, interval_s: float) -> float:
        """Longest tolerated silence for a device reporting every ``interval_s``."""
        return max(self.intervals * interval_s, self.min_silence_s)

    def render_values(self, *, device_id: str, silence_s: float,
                      interval_s: float) -> dict[str, object]:
        """The values a message template is formatted with."""
        return {
            "device_id": device_id, "value": silence_s, "threshold": self.limit_s(interval_s),
            "intervals": self.intervals, "interval_s": interval_s, "rule": self.name,
            "severity": self.severity.value,
        }

    def render(self, *, device_id: str, silence_s: float, interval_s: float) -> str:
        """The alert message for one silent device."""
        values = self.render_values(device_id=device_id, silence_s=silence_s,
                                    interval_s=interval_s)
        template = self.message or (
            "no telemetry from {device_id} for {value:.0f} s (limit {threshold:g} s)"
        )
        return template.format_map(values)


Rule = Annotated[ThresholdRule | AbsenceRule, Field(discriminator="kind")]
"""One alert rule; ``kind`` selects the type."""

_RULE: Final[TypeAdapter[ThresholdRule | AbsenceRule]] = TypeAdapter(Rule)


def _describe(exc: ValidationError, kind: object) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        if loc and loc[0] == kind:  # the discriminated union's tag
            loc = loc[1:]
        where = ".".join(str(p) for p in loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def check_unique(rules: Iterable[ThresholdRule | AbsenceRule], source: str) -> None:
    """Raise :class:`RuleError` when two rules share a name."""
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise RuleError(source, rule.name, "duplicate rule name")
        seen.add(rule.name)


def validate_rules(items: Sequence[object], source: str) -> list[Rule]:
    """Validate raw rule mappings (as read from YAML or JSON).

    Args:
        items: one mapping per rule.
        source: label used in errors, usually the file path.

    Returns:
        The rules, in file order.

    Raises:
        RuleError: on the first invalid rule, naming ``source``, the rule and the problem.
    """
    rules: list[Rule] = []
    for index, item in enumerate(items):
        label = f"rules[{index}]"
        if not isinstance(item, Mapping):
            raise RuleError(source, label, "a rule must be a mapping")
        name = item.get("name")
        if isinstance(name, str):
            label = name
        try:
            rules.append(_RULE.validate_python(item))
        except ValidationError as exc:
            raise RuleError(source, label, _describe(exc, item.get("kind"))) from None
    check_unique(rules, source)
    return rules


def parse_rules(text: str, source: str) -> list[Rule]:
    """Parse and validate a YAML rules document (``rules:`` then a list).

    Args:
        text: the YAML text.
        source: label used in errors, usually the file path.

    Returns:
        The rules, in file order.

    Raises:
        RuleError: the YAML is invalid, has the wrong shape, or a rule is invalid.
    """
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(source, None, f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RuleError(source, None, "top level must be a mapping with a `rules` list")
    unknown = sorted(str(k) for k in data if k != "rules")
    if unknown:
        raise RuleError(source, None, f"unknown top-level keys {unknown}; only `rules` is read")
    items = data.get("rules")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise RuleError(source, None, "`rules` must be a list")
    rules = validate_rules(items, source)
    logger.debug("loaded %d alert rules from %s", len(rules), source)
    return rules


def default_rules_text() -> str:
    """The packaged default rules file's text."""
    return resources.files(__package__ or "cloud.alerts").joinpath(
        DEFAULT_RULES_RESOURCE).read_text(encoding="utf-8")


def load_rules(path: Path | None = None) -> list[Rule]:
    """Load and validate a rules file; ``None`` loads the packaged defaults.

    Raises:
        RuleError: the file cannot be read or is invalid (the message names the file).
    """
    if path is None:
        source = f"<packaged {DEFAULT_RULES_RESOURCE}>"
        try:
            text = default_rules_text()
        except OSError as exc:
            raise RuleError(source, None, f"cannot read: {exc}") from None
        return parse_rules(text, source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RuleError(str(path), None, f"cannot read: {why}") from None
    return parse_rules(text, str(path))
