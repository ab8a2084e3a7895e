"""The engines the integration tests ran on lie inside the ranges distq declares for its extras,
so a declared range never claims a release the tests did not run."""

from __future__ import annotations

import importlib.metadata as metadata
import os

import pytest
from packaging.requirements import Requirement

ENGINE_EXTRAS = ("deepspeed", "horovod", "lightning", "accelerate", "transformers")


def declared() -> list[tuple[str, Requirement]]:
    """(extra, requirement) for every requirement of distq's engine extras."""
    found = []
    for line in metadata.requires("distq") or []:
        requirement = Requirement(line)
        for extra in ENGINE_EXTRAS:
            if requirement.marker and requirement.marker.evaluate({"extra": extra}):
                found.append((extra, requirement))
    return found


def test_every_engine_extra_declares_ranges():
    extras = {extra for extra, _ in declared()}
    assert extras == set(ENGINE_EXTRAS)


@pytest.mark.parametrize(("extra", "requirement"), declared(), ids=str)
def test_installed_engines_lie_in_the_declared_ranges(extra, requirement):
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        if os.environ.get("DISTQ_REQUIRE_EXTRAS") == "1":
            raise
        pytest.skip(f"{requirement.name} (distq[{extra}]) is not installed")
    assert requirement.specifier.contains(version, prereleases=True), (
        f"{requirement.name} {version} is installed, outside distq[{extra}]'s "
        f"{requirement.specifier}: run the tests on it, then widen the range"
    )
