"""The version policy (README: Install), checked on the three files that state it.

pyproject.toml allows a range of each dependency; requirements/cpu.txt pins the release CI runs everything
with; requirements/newest.txt pins the newest releases the ranges allow where they differ from those pins,
which CI runs the HF patch and the benchmarks with (tests/packaging/test_newest_allowed.py). So every
dependency named in pyproject.toml (every extra included) must be pinned in cpu.txt, both pins must lie in
its range, and its range must stop before the next minor release after the newest tested one: a new
minor release of a dependency cannot reach a user before CI has run it."""

import importlib.metadata as metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from packaging_helpers import ROOT, pinned_versions

import mecefo_kernels as mk

tomllib = pytest.importorskip("tomllib")


def project_requirements() -> dict[str, list[Requirement]]:
    """name -> every requirement of it in [project] dependencies and optional-dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, list[Requirement]] = {}
    for line in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(line)
        found.setdefault(canonicalize_name(req.name), []).append(req)
    return found


def next_minor(version: Version) -> Version:
    return Version(f"{version.major}.{version.minor + 1}.0")


PROJECT = project_requirements()
PINNED = pinned_versions(ROOT / "requirements" / "cpu.txt")
NEWEST = pinned_versions(ROOT / "requirements" / "newest.txt")


def test_the_files_name_what_the_policy_is_about():
    assert {"torch", "numpy", "triton", "transformers", "torchft"} <= set(PROJECT)
    assert "transformers" in NEWEST and NEWEST["transformers"] > PINNED["transformers"]


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_each_range_holds_the_tested_releases_and_stops_before_the_next_minor(name):
    assert name in PINNED, f"requirements/cpu.txt must pin {name} (==): the release CI tests it with"
    tested = [PINNED[name]] + ([NEWEST[name]] if name in NEWEST else [])
    newest = max(tested)
    for req in PROJECT[name]:
        for version in tested:
            assert req.specifier.contains(version, prereleases=True), \
                f"pyproject.toml's {req} excludes the tested {name} {version}"
        assert not req.specifier.contains(next_minor(newest), prereleases=True), \
            (f"pyproject.toml's {req} allows {name} {next_minor(newest)}, newer than the newest tested ({newest}): "
             f"bound it with <{newest.major}.{newest.minor + 1}, or test that release (requirements/newest.txt)")


def test_newest_pins_are_newer_than_the_pinned_ones():
    """newest.txt holds the releases that differ from cpu.txt and the packages they newly pull in."""
    for name, version in NEWEST.items():
        assert name not in PINNED or version > PINNED[name], f"{name} {version} in newest.txt is not newer than cpu.txt's"


def test_the_hf_patch_checks_the_same_transformers_range():
    assert {req.specifier for req in PROJECT["transformers"]} == {Requirement(mk.hf.transformers_requirement()).specifier}


def test_this_environment_has_the_pinned_releases():
    """What the rest of the suite runs with is what cpu.txt pins (make installs it)."""
    wrong = {name: metadata.version(name) for name in PROJECT
             if Version(metadata.version(name)).release != PINNED[name].release}
    assert not wrong, f"installed {wrong}, requirements/cpu.txt pins { {n: str(PINNED[n]) for n in wrong} }: run make venv"
