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


# optional extras whose lower bound CI tests too (the test extra installs them): name -> the extra declaring it
TESTED_EXTRAS = {"trl": "trl", "peft": "peft"}


def _extras() -> dict[str, list[str]]:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        block = re.search(r"^\[project\.optional-dependencies\](.*?)^\[", f.read(), re.S | re.M).group(1)
    return {name: re.findall(r'"([^"]+)"', deps) for name, deps in re.findall(r"^(\w+) = \[(.*?)\]", block, re.M)}


def _bound(dep: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
    assert m, f"pyproject.toml: dependency {dep!r} has no lower bound (>=): every bound must be tested"
    return m.group(1).lower(), m.group(2)


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
    extras = _extras()
    for name, extra in TESTED_EXTRAS.items():
        (dep,) = [d for d in extras[extra] if _bound(d)[0] == name]
        in_test = [d for d in extras["test"] if _bound(d)[0] == name]
        assert in_test == [dep], f"the test extra must install {dep!r} as the {extra} extra declares it, got {in_test}"
        declared[name] = _bound(dep)[1]
    assert declared.keys() == pinned.keys(), ("constraints/lower-bounds.txt must pin exactly the base dependencies "
                                              f"and the tested extras {sorted(TESTED_EXTRAS)}")
    for name, bound in declared.items():
        assert _release(pinned[name]) == _release(bound), (
            f"{name}: pyproject.toml allows >= {bound} but CI tests {pinned[name]}; change both together")
