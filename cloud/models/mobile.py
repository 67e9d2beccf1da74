"""A registered version bundled for mobile apps: an Android library (.aar).

An .aar is a zip: ``AndroidManifest.xml`` (the library's package), ``classes.jar``
(here an empty jar: the bundle carries no code), ``R.txt`` (no resources), and the
model under ``assets/``, beside ``assets/<model>.json`` with the input and output
names, shapes and dtypes, the format, version and sha256 an app checks before it
loads the file with the runtime of its format.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloud.models.formats import SUFFIXES
from cloud.models.registry import ModelVersion

MANIFEST = """<?xml version="1.0" encoding="utf-8"?>
<manifest xmlns:android="http://schemas.android.com/apk/res/android"
    package="{package}">
    <uses-sdk android:minSdkVersion="24" />
</manifest>
"""


class MobileError(Exception):
    """The bundle cannot be written; the message says why."""


def package_name(model: str) -> str:
    """The library's Java package: ``org.edgefl.models.<model>``."""
    return "org.edgefl.models." + re.sub(r"[^a-z0-9_]", "_", model.lower())


def _specs(specs: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": [None if d is None else int(d) for d in s.shape],
             "dtype": s.dtype or None} for s in specs]


def _empty_jar() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    return buffer.getvalue()


def write_aar(path: Path, version: ModelVersion, inputs: Sequence[Any],
              outputs: Sequence[Any]) -> None:
    """Write the .aar for ``version`` (its file must be in the artifact store)."""
    if version.format.deployable is None:
        raise MobileError(f"{version.format.value} is not a deployable format")
    asset = f"assets/{version.model}{SUFFIXES[version.format]}"
    metadata = {"model": version.model, "version": version.version,
                "format": version.format.value, "sha256": version.sha256,
                "size_bytes": version.size_bytes, "file": asset.removeprefix("assets/"),
                "inputs": _specs(inputs), "outputs": _specs(outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as aar:
        aar.writestr("AndroidManifest.xml", MANIFEST.format(package=package_name(version.model)))
        aar.writestr("classes.jar", _empty_jar())
        aar.writestr("R.txt", "")
        aar.write(version.path, asset)
        aar.writestr(f"assets/{version.model}.json", json.dumps(metadata, indent=2) + "\n")
    tmp.replace(path)
