"""The dependency bounds CI tests are the ones pyproject.toml declares."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lower_bounds_declared() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # tomllib is 3.11+, the package allows 3.10
        block = re.search(r"^dependencies = \[(.*?)^\]", f.read(), re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
    bounds = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        assert m, f"pyproject.toml: dependency {dep!r} has no lower bound (>=): every bound must be tested"
        bounds[m.group(1).lower()] = m.group(2)
    return bounds


def _pinned() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "constraints", "lower-bounds.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def _release(version: str) -> tuple[int, ...]:
    parts = [int(x) for x in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def test_every_lower_bound_is_pinned_in_the_constraints_ci_installs():
    declared, pinned = _lower_bounds_declared(), _pinned()
    assert declared.keys() == pinned.keys(), "constraints/lower-bounds.txt must pin exactly the base dependencies"
    for name, bound in declared.items():
        assert _release(pinned[name]) == _release(bound), (
            f"{name}: pyproject.toml allows >= {bound} but CI tests {pinned[name]}; change both together")
