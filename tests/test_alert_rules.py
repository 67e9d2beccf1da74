"""Alert rules: the packaged defaults, YAML loading and start-up validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud.alerts import AbsenceRule, RuleError, ThresholdRule, load_rules, parse_rules
from cloud.alerts.rules import SOURCE_FIELDS, validate_rules
from schemas.base import Severity

SOURCE = "rules-under-test.yaml"


def _threshold(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "cpu_high", "kind": "threshold", "source": "telemetry", "field": "cpu_percent",
        "op": ">", "threshold": 90, "severity": "major",
    }
    rule.update(overrides)
    return {k: v for k, v in rule.items() if v is not None}


def _doc(*rules: dict[str, Any]) -> str:
    return yaml.safe_dump({"rules": list(rules)})


def test_default_rules_load() -> None:
    rules = {r.name: r for r in load_rules()}
    assert set(rules) == {
        "cpu_high", "memory_high", "temperature_high", "device_error_rate_high",
        "inference_latency_high", "model_error_rate_high", "model_memory_high", "device_silent",
    }
    expected = {
        "cpu_high": ("telemetry", "cpu_percent", 90.0, Severity.MAJOR),
        "memory_high": ("telemetry", "memory_percent", 90.0, Severity.MAJOR),
        "temperature_high": ("telemetry", "temperature_c", 75.0, Severity.CRITICAL),
        "device_error_rate_high": ("telemetry", "error_rate_percent", 5.0, Severity.MAJOR),
        "inference_latency_high": ("model_metrics", "latency_ms_p95", 200.0, Severity.MINOR),
        "model_error_rate_high": ("model_metrics", "error_rate_percent", 3.0, Severity.MAJOR),
        "model_memory_high": ("model_metrics", "memory_mb", 100.0, Severity.WARNING),
    }
    for name, (source, field, threshold, severity) in expected.items():
        rule = rules[name]
        assert isinstance(rule, ThresholdRule)
        assert (rule.source, rule.field, rule.op, rule.threshold, rule.severity) == (
            source, field, ">", threshold, severity)
        assert rule.clear_at < rule.threshold, f"{name} has no hysteresis"
        assert (rule.for_s is None) != (rule.for_samples is None), f"{name} has no hold"
    silent = rules["device_silent"]
    assert isinstance(silent, AbsenceRule)
    assert (silent.intervals, silent.severity) == (3.0, Severity.CRITICAL)


def test_load_rules_from_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(_doc(_threshold(), {"name": "gone", "kind": "absence", "severity": "minor"}))
    rules = load_rules(path)
    assert [r.name for r in rules] == ["cpu_high", "gone"]
    assert isinstance(rules[1], AbsenceRule)
    assert rules[1].limit_s(10.0) == 30.0


def test_threshold_semantics_and_hysteresis() -> None:
    upper = ThresholdRule.model_validate(_threshold(clear_threshold=80))
    assert upper.breaches(90.5)
    assert not upper.breaches(90.0)
    assert not upper.clears(85.0)
    assert upper.clears(80.0)
    lower = ThresholdRule.model_validate(_threshold(field="battery_percent", op="<", threshold=10,
                                                    clear_threshold=20))
    assert lower.breaches(9.0)
    assert not lower.clears(15.0)
    assert lower.clears(20.0)
    no_hysteresis = ThresholdRule.model_validate(_threshold(op=">="))
    assert no_hysteresis.clear_at == 90.0
    assert no_hysteresis.breaches(90.0)
    assert no_hysteresis.clears(89.9)


def test_watchable_fields_come_from_the_message_models() -> None:
    assert "error_rate_percent" in SOURCE_FIELDS["telemetry"]  # computed field
    assert {"cpu_percent", "temperature_c", "battery_percent", "interval_s"} <= SOURCE_FIELDS[
        "telemetry"]
    assert {"latency_ms_p95", "memory_mb", "accuracy", "error_rate_percent"} <= SOURCE_FIELDS[
        "model_metrics"]
    for fields in SOURCE_FIELDS.values():
        assert not fields & {"device_id", "ts", "seq", "historical", "battery_plugged",
                             "schema_version", "runtime", "counters"}


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        pytest.param(_threshold(field="latency_ms_p95"), "unknown field",
                     id="field-of-other-source"),
        pytest.param(_threshold(source="model_metrics", field="temperature_c"), "unknown field",
                     id="telemetry-field-on-model"),
        pytest.param(_threshold(field="battery_plugged"), "unknown field", id="bool-field"),
        pytest.param(_threshold(field="device_id"), "unknown field", id="text-field"),
        pytest.param(_threshold(field="ts"), "unknown field", id="timestamp"),
        pytest.param(_threshold(op="=>"), "op", id="bad-operator"),
        pytest.param(_threshold(op="=="), "op", id="equality"),
        pytest.param(_threshold(clear_threshold=95), "clear_threshold 95 must be <=",
                     id="clear-above-for-gt"),
        pytest.param(_threshold(op="<", threshold=10, clear_threshold=5),
                     "clear_threshold 5 must be >=", id="clear-below-for-lt"),
        pytest.param(_threshold(for_s=30, for_samples=3), "not both", id="both-holds"),
        pytest.param(_threshold(for_samples=0), "for_samples", id="zero-samples"),
        pytest.param(_threshold(for_s=-1), "for_s", id="negative-duration"),
        pytest.param(_threshold(models=["digits"]), "models", id="models-on-telemetry"),
        pytest.param(_threshold(severity="fatal"), "severity", id="bad-severity"),
        pytest.param(_threshold(for_seconds=30), "for_seconds", id="unknown-key"),
        pytest.param(_threshold(source="logs"), "source", id="bad-source"),
        pytest.param(_threshold(threshold="high"), "threshold", id="non-numeric-threshold"),
        pytest.param(_threshold(message="{device_id} at {cpu}"), "{cpu}",
                     id="unknown-placeholder"),
        pytest.param(_threshold(message="{value:d}"), "cannot be rendered", id="bad-format"),
        pytest.param(_threshold(kind="ratio"), "kind", id="unknown-kind"),
        pytest.param(_threshold(kind=None), "kind", id="missing-kind"),
        pytest.param({"name": "cpu_high", "kind": "absence", "severity": "major", "intervals": 0},
                     "intervals", id="absence-zero-intervals"),
        pytest.param({"name": "cpu_high", "kind": "absence", "severity": "major",
                      "field": "cpu_percent"}, "field", id="absence-with-field"),
    ],
)
def test_bad_rule_names_file_rule_and_problem(rule: dict[str, Any], problem: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(_doc(rule), SOURCE)
    text = str(info.value)
    assert SOURCE in text
    assert "'cpu_high'" in text
    assert problem in text
    assert info.value.rule == "cpu_high"
    assert info.value.source == SOURCE


@pytest.mark.parametrize("name", ["cpu high", "x" * 65, "", "cpu/high", "cpu.high"])
def test_bad_rule_name(name: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(_doc(_threshold(name=name)), SOURCE)
    assert repr(name) in str(info.value)
    assert "name" in info.value.problem


def test_duplicate_rule_names() -> None:
    text = _doc(_threshold(), _threshold(field="memory_percent"))
    with pytest.raises(RuleError, match=r"rules-under-test.yaml: rule 'cpu_high': duplicate"):
        parse_rules(text, SOURCE)


def test_rule_without_a_name_is_named_by_position() -> None:
    with pytest.raises(RuleError, match=r"rule 'rules\[1\]'"):
        parse_rules(_doc(_threshold(), _threshold(name=None)), SOURCE)
    with pytest.raises(RuleError, match=r"rule 'rules\[0\]': a rule must be a mapping"):
        parse_rules("rules: [cpu_high]", SOURCE)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rules: [", "invalid YAML"),
        ("- name: x", "top level must be a mapping"),
        ("rule: []", "unknown top-level keys"),
        ("rules: {name: x}", "must be a list"),
    ],
)
def test_bad_file_shape(text: str, problem: str) -> None:
    with pytest.raises(RuleError, match=problem) as info:
        parse_rules(text, SOURCE)
    assert info.value.rule is None
    assert str(info.value).startswith(SOURCE)


def test_empty_file_means_no_rules() -> None:
    assert parse_rules("rules: []", SOURCE) == []
    assert parse_rules("rules:", SOURCE) == []


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(RuleError, match=r"nope\.yaml: cannot read"):
        load_rules(path)


def test_error_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site-rules.yaml"
    path.write_text(_doc(_threshold(name="hot", field="temperature", op=">")))
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}: rule 'hot': ")
    assert "unknown field 'temperature' for source telemetry" in str(info.value)


def test_validate_rules_accepts_model_filter_and_templates() -> None:
    [rule] = validate_rules([_threshold(
        name="lat", source="model_metrics", field="latency_ms_p95", threshold=200,
        models=["digits", "kws"], message="{model} {version} p95 {value:.0f} ms on {device_id}",
    )], SOURCE)
    assert isinstance(rule, ThresholdRule)
    assert rule.applies_to("digits")
    assert not rule.applies_to("other")
    assert rule.render(device_id="pi-1", value=250.4, model="kws", version="1.2") == (
        "kws 1.2 p95 250 ms on pi-1")
