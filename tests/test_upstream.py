"""The private transformers / accelerate / torch internals tp_trainer relies on are as tp_trainer/upstream.py says.

One test per row of ``upstream.INTERNALS`` (its id is the internal's qualname), a test that the
check can fail, and three guards that keep the table complete: our overrides take the signatures
the table records, every override of an underscore method of a library class has a row, and
every underscore name read from (or attribute assigned on) a library module has one. No process
group, no model: imports and ``inspect`` only.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pathlib
import pkgutil

import pytest

import tp_trainer
from tp_trainer.upstream import INTERNALS, InstanceAttribute, Internal, MissingInternal, check, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("transformers", "accelerate", "torch")
ROWS = {row.qualname: row for row in INTERNALS}

# Rows whose check fails with the installed transformers, for a known reason (kept visible: xfail, not deleted).
KNOWN_BROKEN = {
    "transformers.models.falcon.modeling_falcon:FalconAttention.forward":
        "transformers 5.25 folds Falcon's ALiBi into the attention mask (all heads) and no longer passes alibi to "
        "the attention, so families.attention_hooks' slice_alibi hook never fires (5.5 passes it as "
        "[batch, heads, 1, keys], not the [batch * heads, 1, keys] it slices): ALiBi Falcon fails at tp > 1",
}
# Our overrides whose parameter names differ from upstream's: harmless while the Trainer passes them positionally.
OUR_NAMES_DIFFER: dict[str, str] = {}  # qualname -> why our override's parameter names differ (none today)


def _param(row: Internal):
    reason = KNOWN_BROKEN.get(row.qualname)
    return pytest.param(row, id=row.qualname, marks=[pytest.mark.xfail(reason=reason)] if reason else [])


@pytest.mark.parametrize("row", [_param(row) for row in INTERNALS])
def test_internal_is_still_there(row):
    problems = check(row)
    assert problems == [], f"{row.qualname} ({row.kind}; {row.why}):\n  " + "\n  ".join(problems)


def test_table_is_well_formed():
    assert len(ROWS) == len(INTERNALS), "one row per qualname"
    for row in INTERNALS:
        assert ":" in row.qualname and row.kind in ("override", "call", "patch", "attribute"), row
        assert row.kind != "attribute" or row.params is None, f"{row.qualname}: an attribute has no params"
        assert row.kind != "override" or row.params is not None, f"{row.qualname}: an override names its signature"
        assert row.why and row.used_in, row.qualname
        for use in row.used_in.split(";"):
            assert (ROOT / use.split()[0]).is_file(), f"{row.qualname}: used_in names a missing file {use!r}"


def test_check_fails_on_a_missing_name_a_renamed_parameter_or_a_changed_source():
    save_checkpoint = ROWS["transformers.trainer:Trainer._save_checkpoint"]
    gone = [Internal("transformers.trainer:Trainer._no_such_method", "call", (), "tests", "fake"),
            Internal("transformers.no_such_module:Thing", "call", (), "tests", "fake"),
            Internal("accelerate.state:GradientState.no_such_attribute", "attribute", None, "tests", "fake")]
    for row in gone:
        with pytest.raises(MissingInternal, match=row.qualname.replace(".", r"\.")):
            resolve(row)
        assert len(check(row)) == 1 and row.qualname in check(row)[0]
    changed = [dataclasses.replace(save_checkpoint, params=("model", "trial_id")),  # renamed
               dataclasses.replace(save_checkpoint, params=("model",)),  # an override must match exactly
               Internal("transformers.trainer:Trainer._get_output_dir", "call", ("trial", "model"), "tests", "fake"),
               Internal("accelerate.data_loader:prepare_data_loader", "call", ("device", "dataloader"), "tests",
                        "fake: the right names in the wrong order"),
               Internal("torch.distributed.distributed_c10d:_resolve_process_group", "call", ("name",), "tests",
                        "fake: a builtin, read from its docstring"),
               dataclasses.replace(save_checkpoint, source_has=("store_flos", "no such text"))]
    for row in changed:
        problems = check(row)
        assert len(problems) == 1 and row.qualname in problems[0], (row, problems)
    assert isinstance(resolve(ROWS["transformers.trainer:Trainer.gather_function"]), InstanceAttribute)


# ------------------------------------------------------------------------------------------- completeness
@functools.cache
def _library_subclasses() -> tuple[type, ...]:
    """Every class of tp_trainer with a transformers / accelerate / torch base."""
    found = []
    for info in pkgutil.walk_packages(tp_trainer.__path__, "tp_trainer."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:  # an optional application dependency (datasets, matplotlib)
            if (err.name or "").split(".")[0] in ("tp_trainer",) + LIBRARIES:
                raise
            continue
        found += [cls for cls in vars(module).values() if inspect.isclass(cls) and cls.__module__ == info.name
                  and any(base.__module__.split(".")[0] in LIBRARIES for base in cls.__mro__[1:])]
    return tuple(found)


def _own_methods(cls: type) -> dict[str, object]:
    """The functions written in ``cls``'s body (not what a metaclass adds), unwrapped, and in the bodies of the
    tp_trainer mixins it inherits (``TPTrainerMixin`` has no library base of its own: its overrides count
    for every class it is mixed into)."""
    out = {}
    mixins = [k for k in cls.__mro__[1:] if k.__module__.startswith("tp_trainer.")
              and not any(b.__module__.split(".")[0] in LIBRARIES for b in k.__mro__[1:])]
    for klass in [*reversed(mixins), cls]:
        for name, value in vars(klass).items():
            func = getattr(value, "__func__", getattr(value, "fget", value))
            if inspect.isfunction(func) and func.__qualname__.startswith(f"{klass.__qualname__}."):
                out[name] = func
    return out


def _owner(row: Internal):
    module, _, path = row.qualname.partition(":")
    owner = importlib.import_module(module)
    for part in path.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner, path.split(".")[-1]


def _method_override(row: Internal):
    reason = OUR_NAMES_DIFFER.get(row.qualname)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(row, id=row.qualname, marks=marks)


@pytest.mark.parametrize("row", [_method_override(row) for row in INTERNALS  # methods, not module functions
                                 if row.kind == "override" and "." in row.qualname.partition(":")[2]])
def test_our_overrides_have_the_signature_of_their_row(row):
    try:
        owner, name = _owner(row)
    except (ImportError, AttributeError):
        pytest.skip("gone upstream: test_internal_is_still_there reports it")
    ours = {cls: _own_methods(cls)[name] for cls in _library_subclasses()
            if owner in cls.__mro__ and name in _own_methods(cls)}
    assert ours, f"no class of tp_trainer overrides {row.qualname}: the row is stale"
    wrong = {f"{cls.__module__}.{cls.__qualname__}.{name}": tuple(inspect.signature(func).parameters)[1:]
             for cls, func in ours.items() if tuple(inspect.signature(func).parameters)[1:] != row.params}
    assert not wrong, f"{row.qualname}{row.params} is overridden with other parameters: {wrong}"


def test_every_underscore_override_has_a_row():
    overrides = [_owner(row) for row in INTERNALS if row.kind == "override"]
    missing = []
    for cls in _library_subclasses():
        library_bases = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in LIBRARIES]
        for name in _own_methods(cls):
            if (name.startswith("_") and not name.startswith("__") and any(hasattr(b, name) for b in library_bases)
                    and not any(owner in cls.__mro__ and attr == name for owner, attr in overrides)):
                missing.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    assert not missing, f"overrides of library internals without a row in tp_trainer/upstream.py: {missing}"


def _sources():
    return sorted((ROOT / "tp_trainer").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def _is_private(parts) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def _library_uses(tree: ast.AST) -> set[str]:
    """Dotted names of library objects this file imports or reads with an underscore part, or assigns to."""
    aliases, uses = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in LIBRARIES:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if _is_private(f"{node.module}.{a.name}".split(".")):
                    uses.add(f"{node.module}.{a.name}")
    assigned = {id(t) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}
    for node in ast.walk(tree):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if chain and isinstance(base, ast.Name) and base.id in aliases and (_is_private(chain) or id(node) in assigned):
            uses.add(".".join([aliases[base.id], *chain]))
    return uses


def _import_dotted(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


@functools.cache
def _row_objects() -> frozenset[int]:
    """ids of every object on the path of every row (module, class, attribute)."""
    ids = set()
    for row in INTERNALS:
        module, _, path = row.qualname.partition(":")
        try:
            obj = importlib.import_module(module)
            ids.add(id(obj))
            for part in path.split("."):
                obj = getattr(obj, part)
                ids.add(id(obj))
        except Exception:  # a gone row: test_internal_is_still_there reports it
            continue
    return frozenset(ids)


def _listed(dotted: str) -> bool:
    names = [row.qualname.replace(":", ".") for row in INTERNALS]
    if any(name == dotted or name.startswith(dotted + ".") for name in names):
        return True
    obj = _import_dotted(dotted)  # the same object under another import path (transformers re-exports)
    return obj is not None and not isinstance(obj, (str, int, float, bool)) and id(obj) in _row_objects()


def test_every_private_library_name_we_use_has_a_row():
    missing = [f"{path.relative_to(ROOT)}: {dotted}" for path in _sources()
               for dotted in sorted(_library_uses(ast.parse(path.read_text(), str(path)))) if not _listed(dotted)]
    assert not missing, ("underscore names of transformers/accelerate/torch (or attributes assigned on their modules) "
                         f"without a row in tp_trainer/upstream.py: {missing}")
