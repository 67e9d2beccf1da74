"""Topic builders, filters and parser."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.catalog import CHANNELS
from schemas.errors import InvalidIdError, InvalidTopicError, UnknownTopicError
from schemas.topics import (
    ID_PATTERN,
    TOPIC_TEMPLATES,
    ParsedTopic,
    TopicKind,
    Topics,
    shared_filter,
    validate_publish_topic,
)

ids = st.from_regex(re.compile(rf"\A{ID_PATTERN}\Z"), fullmatch=True)
versions = st.from_regex(re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"), fullmatch=True)
indexes = st.integers(min_value=0, max_value=999_999_999)

SAMPLE_IDS: dict[str, str | int] = {
    "device_id": "pi-07", "model": "digits_mlp", "task": "digits", "command": "ping",
    "rule": "cpu_high", "stage": "shares", "version": "1.4.0", "round": 12, "chunk": 0,
    "instance": "cloud-1",
}


def _ids_for(kind: TopicKind) -> dict[str, str | int]:
    names = re.findall(r"\{(\w+)\}", TOPIC_TEMPLATES[kind])
    return {n: SAMPLE_IDS[n] for n in names}


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_kind_round_trips(kind: TopicKind) -> None:
    topics = Topics()
    values = _ids_for(kind)
    topic = topics.build(kind, **values)
    assert topic.startswith("edgefl/v1/")
    assert topics.parse(topic) == ParsedTopic(kind, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_kind_has_a_channel(kind: TopicKind) -> None:
    assert CHANNELS[kind].kind is kind


def test_named_builders_match_the_table() -> None:
    t = Topics("site-a/edgefl/v1")
    assert t.device_state("d1") == "site-a/edgefl/v1/devices/d1/state"
    assert t.telemetry("d1") == "site-a/edgefl/v1/devices/d1/telemetry"
    assert t.model_metrics("d1", "m") == "site-a/edgefl/v1/devices/d1/models/m/metrics"
    assert t.deployment_status("d1", "m") == "site-a/edgefl/v1/devices/d1/models/m/status"
    assert t.command("d1", "ping") == "site-a/edgefl/v1/devices/d1/cmd/ping"
    assert t.command_reply("d1", "ping") == "site-a/edgefl/v1/devices/d1/cmd/ping/reply"
    assert t.round_plan("tk") == "site-a/edgefl/v1/fl/tk/round"
    assert t.global_model("tk", "3") == "site-a/edgefl/v1/fl/tk/global/3"
    assert t.update("tk", 2, "d1") == "site-a/edgefl/v1/fl/tk/rounds/2/updates/d1"
    assert t.eval_result("tk", 2, "d1") == "site-a/edgefl/v1/fl/tk/rounds/2/evals/d1"
    assert t.secagg_broadcast("tk", 2, "keys") == "site-a/edgefl/v1/fl/tk/rounds/2/secagg/keys"
    assert t.secagg_device("tk", 2, "keys", "d1") == (
        "site-a/edgefl/v1/fl/tk/rounds/2/secagg/keys/d1")
    assert t.secagg_inbox("tk", 2, "shares", "d1") == (
        "site-a/edgefl/v1/fl/tk/rounds/2/secagg/shares/to/d1")
    assert t.parse(t.secagg_inbox("tk", 2, "shares", "to")) == ParsedTopic(
        TopicKind.SECAGG_INBOX, task="tk", round=2, stage="shares", device_id="to")
    assert t.parse(t.secagg_device("tk", 2, "to", "d1")).kind is TopicKind.SECAGG_DEVICE
    assert t.task_status("tk") == "site-a/edgefl/v1/fl/tk/status"
    assert t.release("m") == "site-a/edgefl/v1/models/m/release"
    assert t.chunk("m", "1.0", 5) == "site-a/edgefl/v1/models/m/versions/1.0/chunks/5"
    assert t.cloud_state() == "site-a/edgefl/v1/cloud/state"
    assert t.alert("d1", "cpu") == "site-a/edgefl/v1/alerts/d1/cpu"


@given(device=ids, model=ids, task=ids, version=versions, round_=indexes, chunk=indexes)
def test_round_trip_any_valid_ids(device: str, model: str, task: str, version: str,
                                  round_: int, chunk: int) -> None:
    t = Topics()
    assert t.parse(t.model_metrics(device, model)) == ParsedTopic(
        TopicKind.MODEL_METRICS, device_id=device, model=model)
    assert t.parse(t.update(task, round_, device)) == ParsedTopic(
        TopicKind.UPDATE, task=task, round=round_, device_id=device)
    assert t.parse(t.chunk(model, version, chunk)) == ParsedTopic(
        TopicKind.CHUNK, model=model, version=version, chunk=chunk)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "dévice", "a b", "..", None, 5])
def test_bad_ids_raise_typed_error(bad: object) -> None:
    with pytest.raises(InvalidIdError):
        Topics().telemetry(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["..", ".", "-1", "a/b", "", "1+"])
def test_bad_versions_raise(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        Topics().chunk("m", bad, 0)


@pytest.mark.parametrize("bad", [-1, "01", "1.5", True, 10**10])
def test_bad_indexes_raise(bad: object) -> None:
    with pytest.raises(InvalidIdError):
        Topics().update("t", bad, "d")  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "", "a\x00b"])
def test_publish_topics_refuse_wildcards(topic: str) -> None:
    with pytest.raises(InvalidTopicError):
        validate_publish_topic(topic)


@pytest.mark.parametrize("root", ["", "a//b", "+/x", "a/#", "/a", "a/"])
def test_bad_roots_raise(root: str) -> None:
    with pytest.raises(InvalidTopicError):
        Topics(root)


def test_filters_fix_given_ids_and_wildcard_the_rest() -> None:
    t = Topics()
    assert t.filter(TopicKind.TELEMETRY) == "edgefl/v1/devices/+/telemetry"
    assert t.filter(TopicKind.UPDATE, task="digits", round=3) == (
        "edgefl/v1/fl/digits/rounds/3/updates/+")
    assert t.all() == "edgefl/v1/#"
    assert shared_filter("ingest", t.filter(TopicKind.TELEMETRY)) == (
        "$share/ingest/edgefl/v1/devices/+/telemetry")
    with pytest.raises(TypeError):
        t.filter(TopicKind.TELEMETRY, model="m")


@pytest.mark.parametrize("topic", [
    "edgefl/v1/devices/d1/unknown",
    "edgefl/v2/devices/d1/telemetry",
    "other/devices/d1/telemetry",
    "edgefl/v1/devices/d+/telemetry",
    "edgefl/v1/fl/t/rounds/01/updates/d",
    "edgefl/v1/models/m/versions/../chunks/0",
    "edgefl/v1/devices/d1/telemetry/extra",
])
def test_parse_refuses_unknown_topics(topic: str) -> None:
    with pytest.raises(UnknownTopicError):
        Topics().parse(topic)


def test_build_requires_exact_ids() -> None:
    with pytest.raises(TypeError):
        Topics().build(TopicKind.TELEMETRY)
