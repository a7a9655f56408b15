"""Self-launch: ``tp-trainer train`` run from a shell starts its own world with torch's elastic launcher.

Outside a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) and with more than one
process wanted, the command re-runs itself as::

    python -m torch.distributed.run --standalone --nproc-per-node N --monitor-interval 5 \
        -m tp_trainer.cli train RECIPE.yaml [overrides...]

``--standalone`` rendezvouses on a free local port (several jobs can share a machine);
``--monitor-interval 5`` keeps the agent from competing with the workers for a small CPU;
``OMP_NUM_THREADS`` is set to ``cores // N`` (at least 1) so N workers do not oversubscribe the
cores. Under ``torchrun`` or ``accelerate launch`` (which set ``RANK``/``WORLD_SIZE``) the command
trains directly in the process it was started in. Multi-node runs use ``torchrun`` directly.
"""

from __future__ import annotations

import os
import subprocess
import sys

MONITOR_INTERVAL = 5


def under_launcher(environ=None) -> bool:
    """True inside a torchrun / accelerate launch worker."""
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def default_nproc(tp_size: int) -> int:
    """All visible GPUs on a CUDA machine, otherwise one process per TP rank (dp = 1)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return tp_size


def check_nproc(nproc: int, tp_size: int) -> None:
    if nproc < 1 or nproc % tp_size:
        raise ValueError(f"nproc_per_node={nproc} is not a positive multiple of tp_size={tp_size}: the world is "
                         f"dp x tp, so launch {tp_size}, {2 * tp_size}, ... processes (set nproc_per_node)")


def launcher_command(argv: list[str], nproc: int) -> list[str]:
    """The ``torch.distributed.run`` command line that re-runs ``tp-trainer <argv>`` on ``nproc`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--monitor-interval={MONITOR_INTERVAL}", "-m", "tp_trainer.cli", *argv]


def launcher_env(nproc: int, environ=None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def use_cpu_world_if_no_gpu(environ=None) -> None:
    """On a machine without CUDA, make accelerate (hence the Trainer) see a multi-process CPU world.

    accelerate only recognises ``torchrun`` workers on CPU as one distributed world (``MULTI_CPU``, gloo)
    when told to use the CPU; otherwise every rank believes it is process 0 of 1 (and all of them
    log and write files). Same effect as ``--use_cpu true``.
    """
    import torch

    environ = os.environ if environ is None else environ
    if not torch.cuda.is_available():
        environ.setdefault("ACCELERATE_USE_CPU", "true")


def relaunch(argv: list[str], nproc: int) -> int:
    """Run ``tp-trainer <argv>`` on ``nproc`` local ranks and return the launcher's exit code."""
    return subprocess.call(launcher_command(argv, nproc), env=launcher_env(nproc))
