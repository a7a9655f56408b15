"""The package's layering (docs/design.md, "Layering"): imports point one way, no module needs another first.

::

    commands / cli  ->  app  ->  trainer  ->  checkpoint  ->  zero  ->  parallel
                                 trainer  ->  planner  ->  parallel
                                 trainer  ->  loading (shard-only from_pretrained)  ->  planner, parallel
                        memory (the estimator)  ->  zero, planner, parallel

Checked by reading every module's imports (``ast``: the module-level ones and those inside
functions, since a lazy import is a dependency all the same), not by running anything:

* no module imports from a layer above its own (the table :data:`FORBIDDEN`);
* the module-level imports between tp_trainer's modules form no cycle;
* every module imports on its own, in a fresh interpreter (a module that works only when another
  was imported first fails here, whatever order the rest of the suite imports them in).
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tp_trainer"

# the layer of each top-level module or subpackage of tp_trainer (the package root is none: it re-exports)
LAYERS = {
    "parallel": "parallel",
    "planner": "planner",
    "zero": "zero",
    "checkpoint": "checkpoint",
    "loading": "loading",
    "memory": "memory", "memory_trace": "memory", "memory_theory": "memory",
    "trainer": "trainer", "accelerator": "trainer", "args": "trainer", "checks": "trainer", "tp_config": "trainer",
    "trl": "trainer",
    "extras": "extras",
    "preemption": "trainer", "resilience": "trainer",
    "app": "app",
    "commands": "commands", "cli": "commands",
    "upstream": "table",
}
# layer -> the layers it must not import from
FORBIDDEN = {
    "parallel": {"planner", "zero", "checkpoint", "loading", "memory", "trainer", "app", "commands"},
    "planner": {"zero", "checkpoint", "loading", "memory", "trainer", "app", "commands"},
    "zero": {"planner", "checkpoint", "loading", "memory", "trainer", "app", "commands"},
    "checkpoint": {"loading", "memory", "trainer", "app", "commands"},
    "loading": {"memory", "trainer", "app", "commands"},  # shard-only from_pretrained: planner + parallel
    "memory": {"checkpoint", "loading", "trainer", "app", "commands"},
    "trainer": {"app", "commands"},
    "app": {"commands"},
    "table": {"parallel", "planner", "zero", "checkpoint", "loading", "memory", "trainer", "app", "commands"},
    "extras": {"parallel", "planner", "zero", "checkpoint", "loading", "memory", "trainer", "app", "commands"},
}


def _modules() -> dict[str, pathlib.Path]:
    """``tp_trainer.x.y`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _imports(module: str, path: pathlib.Path, *, top_level_only: bool) -> set[str]:
    """The tp_trainer modules ``module`` imports (``from x import name``: ``x.name`` if it is a module, else ``x``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
            # `from . import sub` needs the submodule, not the (maybe half-initialised) package's names
            names = submodules + ([source] if len(submodules) < len(node.names) else [])
        else:
            continue
        found.update(name for name in names if name in MODULES)
    found.discard(module)
    return found


def test_the_layers_table_covers_every_module():
    unclassified = [m for m in MODULES if m != "tp_trainer" and _layer(m) is None]
    assert not unclassified, f"add these to LAYERS in {__file__}: {unclassified}"


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = []
    for module, path in MODULES.items():
        layer = _layer(module)
        for imported in _imports(module, path, top_level_only=False):
            if _layer(imported) in FORBIDDEN.get(layer, ()):
                wrong.append(f"{module} ({layer}) imports {imported} ({_layer(imported)})")
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_form_no_cycle():
    graph = {m: _imports(m, p, top_level_only=True) for m, p in MODULES.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


ISOLATED_IMPORTS = r"""
import importlib, os, sys, traceback
import time
# the heavy third-party imports once; every tp_trainer module then in a fresh child
import torch, torch.distributed, torch._dynamo, transformers, accelerate
from transformers import AutoModelForCausalLM, PretrainedConfig, Trainer, TrainingArguments
failed = []
for name in sys.argv[1:]:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
    print(f"{name} {time.perf_counter() - t0:.2f}s", file=sys.stderr)
print("FAILED:" + ",".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="one forked child per module")
def test_every_module_imports_on_its_own():
    """Each module imported first and alone (a child forked from an interpreter that has loaded torch and
    transformers but nothing of tp_trainer)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *MODULES], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = proc.stdout.strip().rpartition("FAILED:")[2]
    assert failed == "", f"modules that fail to import on their own: {failed}\n{proc.stderr[-3000:]}"
