"""Nothing in the package unpickles arbitrary objects or runs a model's remote code on its own.

Checked on the source (every call site, present and future): each ``torch.load`` passes
``weights_only=True`` (a checkpoint from elsewhere cannot execute code when resumed), and no
call sets ``trust_remote_code`` to anything but a value the user passed in (never the constant
``True``). The shared-memory segment's permissions are checked in test_shm.py.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tp_trainer")


def _calls():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call):
                        yield os.path.relpath(path, PACKAGE), node


def _callee(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_every_torch_load_is_weights_only():
    loads = [(path, node) for path, node in _calls() if _callee(node) == "torch.load"]
    assert loads, "the scan found no torch.load at all: it is not looking at the package"
    for path, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
            f"tp_trainer/{path}:{node.lineno}: torch.load without weights_only=True")


@pytest.mark.parametrize("keyword", ["trust_remote_code"])
def test_remote_code_runs_only_when_the_user_asks(keyword):
    for path, node in _calls():
        for k in node.keywords:
            if k.arg == keyword:
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), (
                    f"tp_trainer/{path}:{node.lineno}: {keyword}=True hard-coded")
