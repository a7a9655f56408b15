"""The check's ``tp`` worker processes: started early, given the job through a file, collected or killed.

The ranks are fresh interpreters (``python -c``, one thread each: the spawn start method without
multiprocessing's re-import of the caller's ``__main__``, so the check works from any script,
guarded or not), started by :func:`start_ranks` so that their imports of torch and transformers
and the gloo rendezvous on ``127.0.0.1`` overlap the parent's planning. Each runs
:func:`worker_main`, which does the rank's work (:func:`~.step.run_rank`).

Files in the run's temporary directory (nothing else is communicated with the parent):

- ``job.pkl``: written (atomically) by the parent once it has planned: the truncated config, the
  plan, the batch shape, the seed, the threads rank 0 may use and the shared weights' paths;
  the ranks poll for it (and leave if the parent is gone);
- ``rank{r}.ok`` / ``rank{r}.err``: the rank's report, or its stage, module and traceback;
- ``rank{r}.log``: its output, whose tail is reported if it dies without a report.

:meth:`VerifyRanks.wait` gives a failed rank's peers :data:`GRACE_S` to report, then kills what
is left; :meth:`VerifyRanks.close` kills and cleans up in any case (the shared weights file
included, if a rank died before rank 0 unlinked it).
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

GRACE_S = 10.0       # after a rank failed, how long the others get to report before they are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(tp_size: int) -> VerifyRanks:
    """Start the ``tp_size`` processes of a check now (they import torch and meet, then wait for
    :func:`~.check.verify_plan`); ``close()`` them if the check is not run."""
    return VerifyRanks(tp_size).start()


class VerifyRanks:
    """The ``tp`` ranks: started at once (fresh interpreters, one thread each), given the job later.

    The ranks are ``python -c`` processes (the spawn start method without multiprocessing's
    re-import of the caller's ``__main__``: the check works from any script, guarded or not).
    They import torch and transformers and join the process group while the parent plans, then
    wait for ``job.pkl``. :meth:`wait` gives a failed rank's peers :data:`GRACE_S` to report, then
    kills what is left; :meth:`close` kills and cleans up in any case. Each rank's
    output goes to a log whose tail is reported if it dies without a report."""

    def __init__(self, tp: int):
        self.tp = tp
        self.procs, self.logs = [], []
        self.failed_at = None
        self._tmp = None

    def start(self) -> VerifyRanks:
        import subprocess

        import tp_trainer

        self._tmp = tempfile.TemporaryDirectory(prefix="tp-trainer-verify-")
        self.out_dir = self._tmp.name
        self.shm_paths = (os.path.join("/dev/shm", f"tp_trainer_verify_{os.getpid()}_{os.urandom(6).hex()}"),
                          os.path.join(self.out_dir, "weights.bin"))
        root = os.path.dirname(os.path.dirname(os.path.abspath(tp_trainer.__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        port = _free_port()
        code = f"import sys; from {__name__} import worker_main; worker_main(*sys.argv[1:])"
        try:
            for r in range(self.tp):
                log = open(os.path.join(self.out_dir, f"rank{r}.log"), "wb")
                self.logs.append(log)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", code, str(r), str(self.tp), str(port), self.out_dir],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        except BaseException:
            self.close()
            raise
        return self

    def send(self, job: dict) -> None:
        write_atomic(os.path.join(self.out_dir, "job.pkl"), dict(job, shm_paths=self.shm_paths))

    def wait(self, timeout: float) -> tuple[dict[int, dict], bool]:
        """``({rank: record}, timed out)`` once every rank reported, or :data:`GRACE_S` after one failed."""
        deadline, timed_out = time.monotonic() + timeout, False
        while any(p.poll() is None for p in self.procs):
            if all(os.path.exists(os.path.join(self.out_dir, f"rank{r}.ok")) for r in range(self.tp)):
                break  # every rank reported: their exits are not waited for
            now = time.monotonic()
            failed = any(p.poll() not in (None, 0) for p in self.procs) or any(
                os.path.exists(os.path.join(self.out_dir, f"rank{r}.err")) for r in range(self.tp))
            if failed:
                self.failed_at = self.failed_at or now
                if now - self.failed_at > GRACE_S:
                    break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        self._stop()
        return {r: self._record(r, p, timed_out) for r, p in enumerate(self.procs)}, timed_out

    def _record(self, r: int, p, timed_out: bool) -> dict:
        for suffix in ("err", "ok"):
            path = os.path.join(self.out_dir, f"rank{r}.{suffix}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return pickle.load(f)
        with open(os.path.join(self.out_dir, f"rank{r}.log"), "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-20:]
        how = ("killed after another rank failed" if p.returncode == -9 and (self.failed_at or timed_out)
               else f"exited with code {p.returncode}")
        return {"ok": False, "stage": "unknown", "time": math.inf, "module": None,
                "error": f"rank {r} {how} without a report" + ("; its output ends with:\n" + "\n".join(tail)
                                                                  if tail else "")}

    def _stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in self.logs:
            if not log.closed:
                log.close()
        for path in self.shm_paths:  # rank 0 unlinks the shared weights once mapped, unless a rank died first
            if os.path.exists(path) and not os.path.islink(path):
                os.unlink(path)

    def close(self) -> None:
        """Kill what is left and remove the files; idempotent."""
        if self._tmp is not None:
            self._stop()
            self._tmp.cleanup()
            self._tmp = None


def write_atomic(path: str, record) -> None:
    """Pickle ``record`` to ``path`` through a rename: a reader sees the whole file or none."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(tmp, "wb") as f:
        pickle.dump(record, f)
    os.replace(tmp, path)


def wait_for_job(out_dir: str, parent: int) -> dict:
    """The job the parent wrote to ``out_dir/job.pkl`` (polled); leaves if the parent is gone."""
    path = os.path.join(out_dir, "job.pkl")
    while not os.path.exists(path):
        if os.getppid() != parent:
            raise SystemExit("tp-trainer plan --verify: the parent process is gone")
        time.sleep(0.02)
    with open(path, "rb") as f:
        return pickle.load(f)


def worker_main(rank, tp, port, out_dir: str) -> None:
    """One rank (started by :class:`VerifyRanks`): its report, or its traceback, goes to ``out_dir``."""
    rank, tp = int(rank), int(tp)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(tp), "LOCAL_WORLD_SIZE": str(tp),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    state = {"stage": "starting", "module": None, "timings": {}}
    try:
        from .step import run_rank  # imported here: step imports this module

        result = run_rank(rank, tp, out_dir, state)
        write_atomic(os.path.join(out_dir, f"rank{rank}.ok"), {"ok": True, "result": result})
        sys.stdout.flush()
        os._exit(0)  # nothing left to do: no interpreter and process-group teardown (seconds on a busy host)
    except BaseException:
        write_atomic(os.path.join(out_dir, f"rank{rank}.err"),
                     {"ok": False, "stage": state["stage"], "module": state["module"], "error": traceback.format_exc(),
                      "time": time.time(), "partial": {"timings": state["timings"]}})
        os._exit(1)  # close the connections now: the peers' collectives fail instead of waiting
