"""Self-launch: ``tp-trainer train`` run from a shell starts its own world with torch's elastic launcher.

Outside a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) and with more than one
process wanted, the command re-runs itself as::

    python -m torch.distributed.run --standalone --nproc-per-node N --monitor-interval 5 \\
        --max-restarts R --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout S \\
        -m tp_trainer.cli train RECIPE.yaml [overrides...]

``--standalone`` rendezvouses on a free local port (several jobs can share a machine);
``--monitor-interval 5`` keeps the agent from competing with the workers for a small CPU;
``OMP_NUM_THREADS`` is set to ``cores // N`` (at least 1) so N workers do not oversubscribe the
cores. Under ``torchrun`` or ``accelerate launch`` (which set ``RANK``/``WORLD_SIZE``) the command
trains directly in the process it was started in. Multi-node runs use ``torchrun`` directly
(README, "Multi-node").

**Failures and preemption.** When a worker dies, the agent stops the others and starts them all
again, up to ``--max-restarts`` times (the job field ``max_restarts``); restarted workers resume
from the newest complete checkpoint (``tp_trainer.app.resume``). A SIGTERM or SIGUSR1 sent to
this process is passed to the agent, which passes it to every worker (``--signals-to-handle``:
torchrun leaves SIGUSR1, SLURM's warning, out by default), then waits ``--shutdown-timeout``
seconds before it kills them: the time they have to finish the step and save
(``tp_trainer.preemption``). The agent reports a run it was signalled to stop as failed; when a
complete checkpoint newer than the one the run started from exists afterwards, this process
says so and exits 0 instead (nothing is lost: the same command continues from it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

MONITOR_INTERVAL = 5
# torchrun's default set plus SIGUSR1 (SLURM's --signal=USR1@SECONDS before the time limit)
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_MAX_RESTARTS = 3
DEFAULT_SHUTDOWN_TIMEOUT = 120  # seconds: one optimizer step plus one checkpoint save, with margin


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


def check_restarts(max_restarts: int, shutdown_timeout: int) -> None:
    """The two elastic-agent settings of a job, checked before anything is launched."""
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts!r}: give how many times the workers are restarted after a "
                         "failure, an integer >= 0 (0: a failed worker ends the job)")
    if not isinstance(shutdown_timeout, int) or shutdown_timeout < 1:
        raise ValueError(f"shutdown_timeout={shutdown_timeout!r}: give the seconds the workers have to save and exit "
                         "after a SIGTERM/SIGUSR1, an integer >= 1 (it must cover one step and one checkpoint save)")


ENTRY = ("-m", "tp_trainer.cli")


def launcher_command(argv: list[str], nproc: int, *, max_restarts: int = 0,
                     shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT, entry=ENTRY) -> list[str]:
    """The ``torch.distributed.run`` command line that re-runs ``tp-trainer <argv>`` on ``nproc`` ranks
    (``entry``: what each worker runs, ``-m tp_trainer.cli`` or a script's path)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--monitor-interval={MONITOR_INTERVAL}", f"--max-restarts={max_restarts}",
            f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout}", *entry, *argv]


def launcher_env(nproc: int, environ=None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torch 2.13's agent hands every restart the TCP store of the first attempt, keys included: restarted
    # gloo ranks read their predecessors' addresses and fail to connect or wait forever (pytorch#135712).
    # Opting out gives each attempt a fresh store, hosted by its rank 0.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
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


def relaunch(argv: list[str], nproc: int, *, max_restarts: int = 0, shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT,
             output_dir: str | None = None, entry=ENTRY) -> int:
    """Run ``tp-trainer <argv>`` on ``nproc`` local ranks and return the exit code (see the module docstring).

    ``output_dir`` is where the run's checkpoints go: after a preemption signal the exit code is 0 when a
    complete checkpoint newer than the one at launch is there."""
    from .resume import checkpoint_step, newest_complete_checkpoint

    before = newest_complete_checkpoint(output_dir)[0] if output_dir else None
    agent = subprocess.Popen(launcher_command(argv, nproc, max_restarts=max_restarts, shutdown_timeout=shutdown_timeout,
                                              entry=entry), env=launcher_env(nproc))
    received = []

    def forward(signum, frame):
        received.append(signum)
        if agent.poll() is None:
            agent.send_signal(signum)

    # after Popen: the agent starts with the default dispositions. SIGINT from a terminal reaches the agent
    # too (same process group): here it must not kill the wait and orphan the workers.
    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        code = agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    preempted = [s for s in received if s in PREEMPTION_SIGNALS]
    if code != 0 and preempted and output_dir:
        after = newest_complete_checkpoint(output_dir)[0]
        if after is not None and (before is None or checkpoint_step(after) > checkpoint_step(before)):
            step = checkpoint_step(after)
            print(f"tp-trainer train: stopped by {signal.Signals(preempted[0]).name} after saving "
                  f"{os.path.basename(after)}; the same command continues from step {step}", file=sys.stderr,
                  flush=True)
            return 0
    return code
