"""The Grafana dashboards only query measurements, fields and tags that the sink writes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud.storage.line_protocol import SCHEMA

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "edgefl-influxdb"
RESERVED_COLUMNS = frozenset({"_time", "_value", "_field", "_measurement", "_start", "_stop"})

_STRINGS = r'"([^"]*)"'
_MEASUREMENT = re.compile(r'r(?:\._measurement|\["_measurement"\])\s*==\s*' + _STRINGS)
_FIELD = re.compile(r'r(?:\._field|\["_field"\])\s*==\s*' + _STRINGS)
_FIELD_SET = re.compile(r"contains\(\s*value:\s*r\._field\s*,\s*set:\s*\[([^\]]*)\]")
_COMPARED = re.compile(r'r(?:\.([A-Za-z_]\w*)|\["([^"]+)"\])\s*(?:==|!=|=~|!~|<=|>=|<|>)')
_COLUMN_LISTS = re.compile(
    r"\b(?:columns|rowKey|columnKey)\s*:\s*\[([^\]]*)\]")
_COLUMN = re.compile(r'\b(?:column|valueColumn)\s*:\s*' + _STRINGS)
_TAG_ARG = re.compile(r'\btag\s*:\s*' + _STRINGS)


@dataclass
class FluxRefs:
    """What one Flux query refers to."""

    measurements: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)
    """Names that must be tags (``schema.tagValues(tag: ...)``)."""
    columns: set[str] = field(default_factory=set)
    """Names used as columns: tags, or fields once pivoted."""


def extract_refs(query: str) -> FluxRefs:
    """Measurements, fields, tags and columns named in a Flux query."""
    refs = FluxRefs()
    refs.measurements.update(_MEASUREMENT.findall(query))
    refs.fields.update(_FIELD.findall(query))
    for items in _FIELD_SET.findall(query):
        refs.fields.update(re.findall(_STRINGS, items))
    for attr, key in _COMPARED.findall(query):
        refs.columns.add(attr or key)
    for items in _COLUMN_LISTS.findall(query):
        refs.columns.update(re.findall(_STRINGS, items))
    refs.columns.update(_COLUMN.findall(query))
    refs.tags.update(_TAG_ARG.findall(query))
    refs.columns -= RESERVED_COLUMNS
    return refs


def check_query(query: str) -> list[str]:
    """Problems of one query against :data:`SCHEMA` (empty when it only names what exists)."""
    refs = extract_refs(query)
    if not refs.measurements:
        return ["names no measurement"]
    unknown = refs.measurements - SCHEMA.keys()
    if unknown:
        return [f"unknown measurement(s) {sorted(unknown)}"]
    tags = frozenset().union(*(SCHEMA[m][0] for m in refs.measurements))
    fields = frozenset().union(*(SCHEMA[m][1] for m in refs.measurements))
    problems = []
    if refs.fields - fields:
        problems.append(f"unknown field(s) {sorted(refs.fields - fields)}")
    if refs.tags - tags:
        problems.append(f"unknown tag(s) {sorted(refs.tags - tags)}")
    if refs.columns - tags - fields:
        problems.append(f"unknown column(s) {sorted(refs.columns - tags - fields)}")
    return problems


def load(path: Path) -> dict[str, Any]:
    """A dashboard's JSON."""
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def queries(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, datasource, Flux) of every panel target and query variable."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            ds = target.get("datasource") or panel.get("datasource") or {}
            yield f"panel {panel['id']} {panel['title']!r}", ds, target["query"]
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            yield f"variable {variable['name']}", variable["datasource"], variable["query"]


def test_there_are_the_three_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == [
        "federated_training.json", "fleet_overview.json", "model_performance.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_only_name_what_the_sink_writes(path: Path) -> None:
    board = load(path)
    problems: list[str] = []
    measurements: set[str] = set()
    found = 0
    for where, datasource, query in queries(board):
        found += 1
        if datasource.get("uid") != DATASOURCE_UID:
            problems.append(f"{where}: datasource {datasource}")
        if "v.defaultBucket" not in query:
            problems.append(f"{where}: does not read v.defaultBucket")
        problems.extend(f"{where}: {p}" for p in check_query(query))
        measurements |= extract_refs(query).measurements
    assert found >= 4
    assert not problems, "\n".join(problems)
    assert measurements, "the dashboard queries nothing"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = load(path)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"].startswith("edgefl-")
    assert "edgefl" in board["tags"]
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    used = set()
    for _, _, query in queries(board):
        used |= set(re.findall(r"\$\{(\w+)(?::\w+)?\}", query))
    assert used <= variables, f"undefined variables {used - variables}"


def test_dashboards_cover_every_measurement() -> None:
    queried: set[str] = set()
    for path in DASHBOARDS:
        for _, _, query in queries(load(path)):
            queried |= extract_refs(query).measurements
    assert queried == set(SCHEMA)


def test_provisioning_files_parse_and_match_the_dashboards() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "influxdb.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "influxdb"
    assert source["jsonData"]["version"] == "Flux"
    assert source["jsonData"]["defaultBucket"] == "${EDGEFL_INFLUX_BUCKET}"
    assert source["secureJsonData"]["token"] == "${EDGEFL_INFLUX_TOKEN}"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "edgefl.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/edgefl")
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


# -- the checker itself can fail -----------------------------------------------------------

GOOD = """from(bucket: v.defaultBucket)
  |> range(start: v.timeRangeStart, stop: v.timeRangeStop)
  |> filter(fn: (r) => r._measurement == "device_telemetry" and r._field == "cpu_percent")
  |> filter(fn: (r) => r.device_id =~ /^${device:regex}$/)
  |> group(columns: ["device_id", "site"])"""


def test_extractor_finds_every_kind_of_reference() -> None:
    refs = extract_refs(GOOD + """
  |> filter(fn: (r) => contains(value: r._field, set: ["memory_percent", "seq"]))
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> keep(columns: ["_time", "cpu_percent"])
  |> filter(fn: (r) => r["battery_percent"] > 5.0)""")
    assert refs.measurements == {"device_telemetry"}
    assert refs.fields == {"cpu_percent", "memory_percent", "seq"}
    assert refs.columns == {"device_id", "site", "cpu_percent", "battery_percent"}
    assert check_query(GOOD) == []


@pytest.mark.parametrize(("query", "problem"), [
    (GOOD.replace('"cpu_percent"', '"cpu_load"'), "unknown field(s) ['cpu_load']"),
    (GOOD.replace('"device_telemetry"', '"telemetry"'), "unknown measurement(s)"),
    (GOOD.replace('"site"', '"region"'), "unknown column(s) ['region']"),
    (GOOD.replace("r.device_id", "r.hostname"), "unknown column(s) ['hostname']"),
    (GOOD.replace('r._measurement == "device_telemetry" and ', ""), "names no measurement"),
    ('import "influxdata/influxdb/schema"\nschema.tagValues(bucket: v.defaultBucket, '
     'tag: "cpu_percent", predicate: (r) => r._measurement == "device_telemetry")',
     "unknown tag(s) ['cpu_percent']"),
    (GOOD.replace('r._field == "cpu_percent"',
                  'contains(value: r._field, set: ["cpu_percent", "gpu_percent"])'),
     "unknown field(s) ['gpu_percent']"),
])
def test_checker_reports_unknown_names(query: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in check_query(query)), check_query(query)
