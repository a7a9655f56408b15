"""Print the versions of the packages tp_trainer runs on (CI prints them at the top of its log)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "trl", "peft", "pytest")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
