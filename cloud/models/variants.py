"""A release's builds: which variants go with it, and which each device class should take.

``edgefl model release N V --variants auto`` ships, next to ``V``, its siblings
from the optimizer (the versions with the same parent) that are deployable and
within tolerance (not ``rejected``, not retired). Which build a device takes is
decided on the device (:func:`edge_node.ota.choose_build`): the first one it can
load, in the order the manifest's ``prefer`` gives for its device class. That
order comes from what was measured on that class: the fleet benchmark's figures
(``edgefl model benchmark N V --devices ...``) and the cloud's own benchmark (its
machine is a device class too), fastest p50 latency first. A class without
figures takes the manifest's order (the release's version first, then the
variants by their cloud-measured latency).

Pure functions over the registry (worker thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloud.models.registry import ModelRegistry, ModelVersion, VersionState
from schemas.release import MAX_VARIANTS

MEASURED_ON_CLASS = ("fleet-benchmark", "benchmark")
"""Registry metric sources whose figures belong to a device class."""
UNUSABLE = frozenset({VersionState.REJECTED, VersionState.RETIRED})


class VariantError(ValueError):
    """A variant that cannot go with the release; the message says why."""


@dataclass(frozen=True, slots=True)
class Builds:
    """The release's version and its variants, and the preferred order per device class."""

    release: ModelVersion
    variants: list[ModelVersion]
    prefer: dict[str, list[str]]

    @property
    def all(self) -> list[ModelVersion]:
        """Every build, the release's own first."""
        return [self.release, *self.variants]


def _latency(registry: ModelRegistry, version: ModelVersion) -> dict[str, float]:
    """p50 latency per device class ('' for a figure of no class)."""
    out: dict[str, float] = {}
    for metric in registry.metrics(version.model, version.version):
        if metric.name == "latency_ms_p50":
            if metric.source in MEASURED_ON_CLASS and metric.device_class:
                out[metric.device_class] = metric.value
            elif metric.source == "optimizer":
                out.setdefault("", metric.value)
    return out


def auto_variants(registry: ModelRegistry, release: ModelVersion) -> list[ModelVersion]:
    """The release's siblings from the optimizer that a device could take instead."""
    if release.parent_version is None:
        return []
    return [v for v in registry.children(release.model, release.parent_version)
            if v.version != release.version and v.format.deployable is not None
            and v.state not in UNUSABLE]


def resolve(registry: ModelRegistry, release: ModelVersion, named: Sequence[str], *,
            auto: bool) -> Builds:
    """The builds of a release: ``named`` variants, or the optimizer's siblings (``auto``).

    Raises:
        VariantError: a named variant is unknown to the release's model, not
            deployable, rejected, retired, or the release itself; too many variants.
        RegistryError: a named version does not exist.
    """
    chosen: list[ModelVersion] = []
    for name in named:
        version = registry.get(release.model, name)
        if version.version == release.version:
            raise VariantError(f"{name} is the release itself")
        if version.format.deployable is None:
            raise VariantError(f"{name} is {version.format.value}, not a deployable format")
        if version.state in UNUSABLE:
            raise VariantError(f"{name} is {version.state.value}")
        chosen.append(version)
    if auto:
        chosen += [v for v in auto_variants(registry, release)
                   if v.version not in {c.version for c in chosen}]
    latency = {v.version: _latency(registry, v) for v in [release, *chosen]}
    # The manifest's order: the operator's choices, then by the latency measured here.
    chosen.sort(key=lambda v: (v.version not in named,
                               latency[v.version].get("", float("inf"))))
    if len(chosen) > MAX_VARIANTS:
        if not auto or len(named) > MAX_VARIANTS:
            raise VariantError(f"at most {MAX_VARIANTS} variants per release")
        chosen = chosen[:MAX_VARIANTS]
    builds = [release, *chosen]
    classes = sorted({c for figures in latency.values() for c in figures if c})
    prefer: dict[str, list[str]] = {}
    for device_class in classes:
        measured = sorted((latency[b.version][device_class], i) for i, b in enumerate(builds)
                          if device_class in latency[b.version])
        ranked = [builds[i].version for _, i in measured]
        prefer[device_class] = ranked + [b.version for b in builds if b.version not in ranked]
    return Builds(release, chosen, dict(list(prefer.items())[:64]))
