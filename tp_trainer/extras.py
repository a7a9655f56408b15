"""Optional dependencies, imported when a feature needs them: a missing one is an ImportError naming the extra.

``pip install "tp_trainer[trl]"`` adds TRL (``tp_trainer.trl``, ``trainer: dpo`` recipes),
``pip install "tp_trainer[peft]"`` adds PEFT (LoRA).
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"trl": "trl", "peft": "peft"}  # module -> the extra that installs it


def require(module: str, *, feature: str) -> ModuleType:
    """``import module``, or an ImportError saying which extra installs it and what needs it."""
    extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs {module}, which is not installed: "
                          f'pip install "tp_trainer[{extra}]"') from err
