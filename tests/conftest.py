"""Session setup: the test device (``TP_TRAINER_TEST_DEVICE``, see tests/distributed.py) and the ``cpu_only`` marker.

* ``cpu`` (default): the GPUs are hidden (``CUDA_VISIBLE_DEVICES=""``) from this process and all it
  spawns or launches, so the library, the Trainer and accelerate take the CPU/gloo path as on a
  machine without GPUs.
* ``cuda``: NCCL worlds on the GPUs; an error when torch sees no GPU; tests marked
  ``cpu_only(reason=...)`` are skipped with their reason.
* anything else: a usage error naming the variable and the allowed values.
"""

from __future__ import annotations

import os

import pytest

_DEVICE = {"name": "cpu", "backend": "gloo"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): CPU-only by nature (gloo, shared memory, CPU kernels, host memory) or by "
                   "construction; skipped when TP_TRAINER_TEST_DEVICE=cuda")
    try:
        from distributed import TEST_BACKEND, TEST_DEVICE, check_cuda_available
    except ValueError as err:  # an unknown TP_TRAINER_TEST_DEVICE
        raise pytest.UsageError(str(err)) from None
    if TEST_DEVICE == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA; inherited by every child
        import torch

        if torch.cuda.is_available():
            raise pytest.UsageError("TP_TRAINER_TEST_DEVICE=cpu, but CUDA was initialised before tests/conftest.py "
                                    "could hide the GPUs (CUDA_VISIBLE_DEVICES='')")
    else:
        try:
            check_cuda_available()
        except RuntimeError as err:
            raise pytest.UsageError(str(err)) from None
    _DEVICE.update(name=TEST_DEVICE, backend=TEST_BACKEND)


def pytest_report_header(config):
    extra = ""
    if _DEVICE["name"] == "cuda":
        import torch

        extra = f", {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    return f"tp_trainer test device: {_DEVICE['name']} ({_DEVICE['backend']}{extra})"


def pytest_collection_modifyitems(config, items):
    if _DEVICE["name"] == "cpu":
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "CPU-only")
            item.add_marker(pytest.mark.skip(reason=f"cpu_only under TP_TRAINER_TEST_DEVICE={_DEVICE['name']}: "
                                                    f"{reason}"))
