"""The model registry: versions, content-addressed artifacts, life cycle, and ``edgefl model``."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors
from typer.testing import CliRunner

from cloud.demo_model import export_onnx
from cloud.models.formats import ArtifactFormat, FormatError, check_claim, detect_format
from cloud.models.registry import (
    TRANSITIONS,
    ModelRegistry,
    NotFoundError,
    RegistryError,
    VersionExistsError,
    VersionState,
)
from cloud.models.weights import WeightsError, task_weights
from cloud.releases import load_signing_key, public_key_b64
from cloud.storage.sqlite_store import SqliteStore
from edge_node.inference import SIGNATURE_FILE
from edgefl.cli import build_app
from fl_tasks.base import get_weights
from fl_tasks.digits import DigitsTask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
TFLITE = FIXTURES / "digits_mlp.tflite"

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(scope="module")
def onnx_bytes(task: DigitsTask) -> bytes:
    return export_onnx(task, get_weights(task.build_model()))


@pytest.fixture(scope="module")
def torchscript_bytes(task: DigitsTask) -> bytes:
    buffer = io.BytesIO()
    signature = {"inputs": [{"name": "x", "shape": [None, 64], "dtype": "float32"}],
                 "outputs": [{"name": "logits", "shape": [None, 10], "dtype": "float32"}]}
    torch.jit.save(torch.jit.script(task.build_model().eval()), buffer,
                   _extra_files={SIGNATURE_FILE: json.dumps(signature)})
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights_bytes(task: DigitsTask) -> bytes:
    return save_safetensors(get_weights(task.build_model()))


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(SqliteStore(tmp_path / "store.sqlite3"), tmp_path / "artifacts")


# -- formats -----------------------------------------------------------------------------


def test_each_format_is_told_from_its_bytes(onnx_bytes: bytes, torchscript_bytes: bytes,
                                            weights_bytes: bytes) -> None:
    assert detect_format(onnx_bytes) is ArtifactFormat.ONNX
    assert detect_format(TFLITE.read_bytes()) is ArtifactFormat.TFLITE
    assert detect_format(torchscript_bytes) is ArtifactFormat.TORCHSCRIPT
    assert detect_format(weights_bytes) is ArtifactFormat.WEIGHTS
    for junk in (b"", b"\x00" * 100, b"hello world, not a model", b"PK\x03\x04broken zip"):
        with pytest.raises(FormatError):
            detect_format(junk)


def test_a_file_that_is_not_what_it_claims_is_refused(onnx_bytes: bytes) -> None:
    check_claim(onnx_bytes, ArtifactFormat.ONNX)
    with pytest.raises(FormatError, match="the file is onnx, not tflite"):
        check_claim(onnx_bytes, ArtifactFormat.TFLITE)


def test_weights_fit_the_task_or_say_why(task: DigitsTask, weights_bytes: bytes) -> None:
    loaded = task_weights(task, weights_bytes)
    assert loaded.from_task == []
    partial = get_weights(task.build_model())
    dropped = sorted(partial)[0]
    del partial[dropped]
    assert task_weights(task, save_safetensors(partial)).from_task == [dropped]
    with pytest.raises(WeightsError, match="has no tensor"):
        task_weights(task, save_safetensors({"other.weight": np.zeros(3, np.float32)}))
    wrong = get_weights(task.build_model())
    name = next(iter(wrong))
    wrong[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(WeightsError, match="shape"):
        task_weights(task, save_safetensors(wrong))
    with pytest.raises(WeightsError, match="not a safetensors"):
        task_weights(task, b"junk" * 10)


# -- registry ------------------------------------------------------------------------------


def test_versions_are_rows_and_files_are_stored_once_by_content(
    registry: ModelRegistry, onnx_bytes: bytes, tmp_path: Path,
) -> None:
    first = registry.register("digits", "1.0.0", onnx_bytes, ArtifactFormat.ONNX,
                              task="fl_tasks.digits:DigitsTask", input_shape=[-1, 64],
                              metrics={"accuracy": 0.9})
    assert first.state is VersionState.DRAFT and first.size_bytes == len(onnx_bytes)
    assert first.path == tmp_path / "artifacts" / first.sha256[:2] / first.sha256
    assert registry.read(first) == onnx_bytes
    # The same bytes again under the same version: a no-op; under another: one file.
    assert registry.register("digits", "1.0.0", onnx_bytes, ArtifactFormat.ONNX) == first
    second = registry.register("digits", "1.0.1", onnx_bytes, ArtifactFormat.ONNX,
                               parent_version="1.0.0")
    assert second.path == first.path
    assert len(list((tmp_path / "artifacts").rglob("*"))) == 2  # one folder, one file
    with pytest.raises(VersionExistsError):
        registry.register("digits", "1.0.0", onnx_bytes + b"x", ArtifactFormat.ONNX)
    assert [v.version for v in registry.lineage("digits", "1.0.1")] == ["1.0.1", "1.0.0"]
    assert [v.version for v in registry.children("digits", "1.0.0")] == ["1.0.1"]
    assert {m.name: m.value for m in registry.metrics("digits", "1.0.0")} == {"accuracy": 0.9}
    # Everything reloads from the store.
    again = ModelRegistry(SqliteStore(tmp_path / "store.sqlite3"), tmp_path / "artifacts")
    assert again.get("digits", "1.0.0") == first
    assert again.models() == [{"name": "digits", "task": "fl_tasks.digits:DigitsTask",
                               "created_at": again.models()[0]["created_at"], "versions": 2,
                               "latest": "1.0.1", "active": []}]


def test_bad_versions_and_unknown_names_are_refused(registry: ModelRegistry,
                                                    onnx_bytes: bytes) -> None:
    for bad in ("1", "1.0", "v1.0.0", "1.0.0.0", "latest"):
        with pytest.raises(RegistryError, match="not a semantic version"):
            registry.register("digits", bad, onnx_bytes, ArtifactFormat.ONNX)
    with pytest.raises(RegistryError, match="parent version"):
        registry.register("digits", "2.0.0", onnx_bytes, ArtifactFormat.ONNX,
                          parent_version="1.9.9")
    with pytest.raises(RegistryError, match="empty"):
        registry.register("digits", "2.0.0", b"", ArtifactFormat.ONNX)
    with pytest.raises(NotFoundError, match="no model named"):
        registry.get("nope", "1.0.0")
    registry.register("digits", "2.0.0", onnx_bytes, ArtifactFormat.ONNX)
    with pytest.raises(NotFoundError, match="has no version"):
        registry.get("digits", "9.9.9")
    # Semantic ordering, not text ordering.
    registry.register("digits", "10.0.0", onnx_bytes, ArtifactFormat.ONNX)
    registry.register("digits", "2.0.0-rc.1", onnx_bytes, ArtifactFormat.ONNX)
    assert [v.version for v in registry.versions("digits")] == ["2.0.0-rc.1", "2.0.0",
                                                                "10.0.0"]


def test_the_life_cycle_allows_only_its_moves_and_records_each(
    registry: ModelRegistry, onnx_bytes: bytes,
) -> None:
    registry.register("digits", "1.0.0", onnx_bytes, ArtifactFormat.ONNX)
    for state, reason in ((VersionState.CANARY, "canary 2 devices"),
                          (VersionState.ACTIVE, "widened to the fleet"),
                          (VersionState.ROLLED_BACK, "alert on canary"),
                          (VersionState.RETIRED, "operator")):
        registry.set_state("digits", "1.0.0", state, reason)
    assert registry.get("digits", "1.0.0").state is VersionState.RETIRED
    events = [(e.event, e.detail) for e in registry.events("digits", "1.0.0")]
    assert events[1:] == [("canary", "canary 2 devices"), ("active", "widened to the fleet"),
                          ("rolled_back", "alert on canary"), ("retired", "operator")]
    with pytest.raises(RegistryError, match="retired: it cannot become active"):
        registry.set_state("digits", "1.0.0", VersionState.ACTIVE, "again")
    # Every state has its row in the table; retired is final.
    assert set(TRANSITIONS) == set(VersionState)
    assert TRANSITIONS[VersionState.RETIRED] == frozenset()


def test_a_corrupted_artifact_is_detected_not_served(registry: ModelRegistry,
                                                     onnx_bytes: bytes) -> None:
    version = registry.register("digits", "1.0.0", onnx_bytes, ArtifactFormat.ONNX)
    os.chmod(version.path, stat.S_IWUSR | stat.S_IRUSR)
    version.path.write_bytes(onnx_bytes[:-1] + b"\x00")
    with pytest.raises(RegistryError, match="corrupted"):
        registry.read(version)
    # Registering the same bytes again repairs the file.
    registry.register("digits", "1.0.0", onnx_bytes, ArtifactFormat.ONNX)
    assert registry.read(version) == onnx_bytes


# -- the command line ------------------------------------------------------------------------


def _model(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(build_app("model"), ["model", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_register_list_show_from_the_command_line(
    tmp_path: Path, onnx_bytes: bytes, torchscript_bytes: bytes, weights_bytes: bytes,
) -> None:
    folder = ["--data-dir", str(tmp_path / "cloud")]
    (tmp_path / "m.onnx").write_bytes(onnx_bytes)
    (tmp_path / "m.pt").write_bytes(torchscript_bytes)
    (tmp_path / "w.safetensors").write_bytes(weights_bytes)
    code, out = _model("register", str(tmp_path / "m.onnx"), "--name", "digits", "--version",
                       "1.0.0", *folder)
    assert code == 0, out
    assert "registered digits 1.0.0: onnx" in out
    code, out = _model("register", str(TFLITE), "--name", "digits", "--version", "1.0.1",
                       "--format", "tflite", "--parent", "1.0.0", *folder)
    assert code == 0, out
    code, out = _model("register", str(tmp_path / "m.pt"), "--name", "digits", "--version",
                       "1.0.2", *folder, "--json")
    assert code == 0, out
    assert json.loads(out)["format"] == "torchscript"
    assert json.loads(out)["input_shape"] == [-1, 64]
    code, out = _model("register", str(tmp_path / "w.safetensors"), "--name", "digits",
                       "--version", "0.1.0", "--task", "fl_tasks.digits:DigitsTask", *folder)
    assert code == 0, out
    code, out = _model("list", *folder, "--json")
    assert code == 0, out
    [listed] = json.loads(out)
    assert listed["versions"] == 4 and listed["latest"] == "1.0.2"
    code, out = _model("show", "digits", "1.0.1", *folder, "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["lineage"] == ["1.0.1", "1.0.0"] and shown["format"] == "tflite"
    assert shown["input_shape"] == [-1, 64]
    assert [e["event"] for e in shown["events"]] == ["registered"]
    code, out = _model("show", "digits", *folder)
    assert code == 0 and "1.0.2" in out and "torchscript" in out, out
    code, out = _model("list", *folder)
    assert code == 0 and "digits" in out, out


@pytest.mark.parametrize(("args", "expected"), [
    (["--format", "tflite"], "the file is onnx, not tflite"),
    (["--format", "pickle"], "unknown format 'pickle'"),
    (["--version", "latest"], "not a semantic version"),
    (["--name", "bad name"], "model name"),
])
def test_register_refuses_bad_input_in_one_line(
    tmp_path: Path, onnx_bytes: bytes, args: list[str], expected: str,
) -> None:
    (tmp_path / "m.onnx").write_bytes(onnx_bytes)
    base = {"--name": "digits", "--version": "1.0.0"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [x for pair in base.items() for x in pair]
    code, out = _model("register", str(tmp_path / "m.onnx"), *flat,
                       "--data-dir", str(tmp_path / "cloud"))
    assert code == 2, out
    assert expected in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


def test_register_refuses_what_does_not_load_or_fit(tmp_path: Path, onnx_bytes: bytes,
                                                     weights_bytes: bytes) -> None:
    folder = ["--data-dir", str(tmp_path / "cloud")]
    # Parses as ONNX but the runtime cannot load it: a node of an unknown operator.
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    model.graph.node[0].op_type = "NoSuchOperator"
    (tmp_path / "bad.onnx").write_bytes(model.SerializeToString())
    code, out = _model("register", str(tmp_path / "bad.onnx"), "--name", "digits",
                       "--version", "1.0.0", *folder)
    assert code == 2 and "does not load as onnx" in out, out
    (tmp_path / "w.safetensors").write_bytes(weights_bytes)
    code, out = _model("register", str(tmp_path / "w.safetensors"), "--name", "digits",
                       "--version", "1.0.0", *folder)
    assert code == 2 and "needs --task" in out, out
    code, out = _model("register", str(tmp_path / "w.safetensors"), "--name", "digits",
                       "--version", "1.0.0", "--task", "fl_tasks.digits:DigitsTask",
                       "--task-arg", "model=cnn", *folder)
    assert code == 2 and "do not fit" in out, out
    code, out = _model("register", str(tmp_path / "missing.onnx"), "--name", "digits",
                       "--version", "1.0.0", *folder)
    assert code == 2 and "cannot read" in out, out
    assert not (tmp_path / "cloud").exists(), "a refused register leaves nothing behind"
    code, out = _model("show", "digits", *folder)
    assert code == 2 and "no cloud store" in out, out
    SqliteStore(tmp_path / "cloud" / "edgefl.sqlite3").close()
    code, out = _model("show", "digits", *folder)
    assert code == 2 and "no model named 'digits'" in out, out


def test_keygen_writes_an_owner_only_key_and_prints_what_devices_trust(tmp_path: Path) -> None:
    folder = ["--data-dir", str(tmp_path / "cloud")]
    code, out = _model("keygen", *folder)
    assert code == 0, out
    path = tmp_path / "cloud" / "keys" / "release.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"release-1: {public_key_b64(load_signing_key(path))}" in out
    assert path.with_suffix(".pub").read_text().strip() == public_key_b64(load_signing_key(path))
    code, out = _model("keygen", *folder)
    assert code == 2 and "exists" in out, out
    before = path.read_bytes()
    code, out = _model("keygen", *folder, "--force")
    assert code == 0 and path.read_bytes() != before


def test_package_writes_an_android_library_with_the_model_and_its_metadata(
    tmp_path: Path, onnx_bytes: bytes,
) -> None:
    import hashlib
    import zipfile

    folder = ["--data-dir", str(tmp_path / "cloud")]
    (tmp_path / "m.onnx").write_bytes(onnx_bytes)
    code, out = _model("register", str(tmp_path / "m.onnx"), "--name", "digits", "--version",
                       "1.0.0", *folder)
    assert code == 0, out
    aar = tmp_path / "out" / "digits.aar"
    code, out = _model("package", "digits", "1.0.0", "--android", str(aar), *folder)
    assert code == 0, out
    with zipfile.ZipFile(aar) as bundle:
        names = set(bundle.namelist())
        assert names == {"AndroidManifest.xml", "classes.jar", "R.txt", "assets/digits.onnx",
                         "assets/digits.json"}
        assert 'package="org.edgefl.models.digits"' in bundle.read("AndroidManifest.xml").decode()
        model = bundle.read("assets/digits.onnx")
        meta = json.loads(bundle.read("assets/digits.json"))
        with zipfile.ZipFile(io.BytesIO(bundle.read("classes.jar"))) as jar:
            assert jar.namelist() == ["META-INF/MANIFEST.MF"]
    assert model == onnx_bytes and meta["sha256"] == hashlib.sha256(model).hexdigest()
    assert meta["inputs"] == [{"name": "x", "shape": [None, 64], "dtype": "float32"}]
    assert meta["outputs"][0]["name"] == "logits" and meta["version"] == "1.0.0"
    code, out = _model("package", "digits", "9.9.9", "--android", str(aar), *folder)
    assert code == 2 and "has no version" in out, out
