"""A run survives what a shared cluster does to it: preemption signals, killed ranks, restarts.

* **Resume decisions** (``tp_trainer/app/resume.py``, no process group): ``auto`` takes the newest
  *complete* checkpoint and skips incomplete ones with the reason; ``none``, a path,
  ``overwrite_output_dir`` and torchrun restarts behave as documented.
* **Preemption** (``tp_trainer/preemption.py``) in a real 2-rank world, at tp=2 (ZeRO-1) and at dp=2
  (ZeRO-1): a signal sent to *one* rank mid-run (SIGTERM to rank 1, SIGUSR1 to rank 0) makes both
  ranks finish that step, write ``checkpoint-N`` (also with ``save_strategy: no``) and exit 0; a run
  resumed from it (``resume_from_checkpoint: auto``) ends with weights *bit-identical* to an
  uninterrupted run: fp32 on the CPU, same operations in the same order on the same data (the
  resume restores weights, optimizer, scheduler, RNG and data position), so no tolerance.
* **The command** (``tp-trainer train recipes/tiny-sft.yaml``, tiny, one process): a second launch
  resumes from the newest checkpoint (says so, its log_history continues from that step);
  ``--overwrite_output_dir true`` starts over from step 0 and removes the old checkpoints.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from distributed import run_distributed
from models import tiny_model
from test_checkpoint import full_weights, make_dataset  # the same learnable sequences of SEQ tokens

pytestmark = pytest.mark.cpu_only(reason="the worlds train with use_cpu=True and signal processes on this host")

STEPS, SIGNAL_AT, N_TRAIN = 8, 4, 64


# ------------------------------------------------------------------------------------ resume decisions
def fake_sharded(path, files=None, *, step=None):
    """A checkpoint directory in the sharded format: files, then the manifest that lists them (sizes)."""
    from tp_trainer.checkpoint.layout import FORMAT, MANIFEST

    os.makedirs(path)
    files = files or {"model-tp00-of-01.safetensors": b"x" * 10, "optim-rank00000.safetensors": b"y" * 7}
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    if step is not None:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step}, f)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, "version": 1,
                   "files": {n: {"bytes": len(d), "sha256": "-"} for n, d in files.items()}}, f)
    return str(path)


def fake_plain(path, step):
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"w")
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    return str(path)


def test_auto_takes_the_newest_complete_checkpoint_and_names_what_it_skipped(tmp_path):
    from tp_trainer.app import resume

    out = tmp_path / "out"
    fake_sharded(out / "checkpoint-2", step=2)
    good = fake_sharded(out / "checkpoint-10", step=10)  # numeric order, not string order: 10 > 9 > 2
    fake_plain(out / "checkpoint-9", 9)
    truncated = fake_sharded(out / "checkpoint-12", step=12)
    with open(os.path.join(truncated, "optim-rank00000.safetensors"), "wb") as f:
        f.write(b"y")
    missing_rank = fake_sharded(out / "checkpoint-14", step=14)
    os.remove(os.path.join(missing_rank, "model-tp00-of-01.safetensors"))
    os.makedirs(out / "checkpoint-16")  # a plain Trainer save killed before its trainer_state.json
    fake_sharded(out / ".tmp-checkpoint-18", step=18)  # an interrupted sharded save: never a candidate
    os.makedirs(out / "checkpoint-20")
    with open(out / "checkpoint-20" / "tp_checkpoint.json", "w") as f:
        f.write('{"format": "tp_trainer-sharded-checkpoint", "files": {')  # a manifest cut short

    got = resume.decide("auto", str(out))
    assert (got.path, got.step) == (good, 10)
    assert got.message == "resuming from step 10 (checkpoint-10; auto)"
    assert len(got.skipped) == 4
    assert "checkpoint-20/tp_checkpoint.json is unreadable" in got.skipped[0]
    assert "checkpoint-16 has neither tp_checkpoint.json nor trainer_state.json" in got.skipped[1]
    assert "checkpoint-14/model-tp00-of-01.safetensors is missing" in got.skipped[2]
    assert "checkpoint-12/optim-rank00000.safetensors has 1 bytes, the manifest says 7" in got.skipped[3]
    assert resume.decide(True, str(out)).path == good  # resume_from_checkpoint=True means the same

    assert resume.decide("auto", str(tmp_path / "empty")) == resume.Resume(
        None, 0, f"starting from step 0: no complete checkpoint in {tmp_path / 'empty'} (auto)")
    for value in (None, "none", "null", "", False):
        assert resume.decide(value, str(out)).path is None
    plain = resume.decide(str(out / "checkpoint-9"), str(out))
    assert (plain.path, plain.step) == (str(out / "checkpoint-9"), 9)


def test_restarts_continue_from_the_newest_and_overwrite_starts_over(tmp_path):
    from tp_trainer.app import resume

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    old = fake_sharded(elsewhere / "checkpoint-3", step=3)
    newest = fake_sharded(out / "checkpoint-6", step=6)
    # an explicit path is for the first attempt; a restarted worker continues from this run's newest
    assert resume.decide(old, str(out)).path == old
    restarted = resume.decide(old, str(out), restart_count=1)
    assert restarted.path == newest and restarted.message == "resuming from step 6 (checkpoint-6; restart 1)"
    assert resume.decide("none", str(out), restart_count=2).path == newest
    assert resume.decide(old, str(tmp_path / "nothing_yet"), restart_count=1).path == old

    # overwrite_output_dir: the old run's checkpoints go (else a later `auto` resumes them), once
    fake_sharded(out / ".tmp-checkpoint-7")
    with pytest.raises(ValueError, match="lies in output_dir .* overwrite_output_dir deletes"):
        resume.decide(newest, str(out), overwrite=True)  # refused before anything is deleted
    assert os.path.isdir(newest)
    fresh = resume.decide("auto", str(out), overwrite=True)
    assert fresh.path is None and "removed 2 checkpoint(s)" in fresh.message
    assert sorted(os.listdir(out)) == []
    fake_sharded(out / "checkpoint-2", step=2)  # saved by the new run before a worker was killed
    assert resume.decide("auto", str(out), overwrite=True, restart_count=1).path == str(out / "checkpoint-2")


def test_an_explicit_checkpoint_must_be_complete(tmp_path):
    from tp_trainer.app import resume

    partial = tmp_path / "out" / "checkpoint-4"
    os.makedirs(partial)
    good = fake_sharded(tmp_path / "out" / "checkpoint-2", step=2)
    for value, words in [(str(partial), "has neither tp_checkpoint.json nor trainer_state.json"),
                         (str(tmp_path / "typo"), "is not a directory")]:
        with pytest.raises(ValueError) as err:
            resume.check_resume_value(value, str(tmp_path / "out"))
        message = str(err.value)
        assert f"resume_from_checkpoint={value!r} is not a complete checkpoint" in message and words in message
        assert f"({good} is the newest complete one in output_dir)" in message and "'auto'" in message
    resume.check_resume_value("auto", str(tmp_path / "out"))
    resume.check_resume_value(good, str(tmp_path / "out"))


# ------------------------------------------------------------------------------------ preemption in a world
def train(out, layout, *, signal_at=None, resume_value="none"):
    """One run of STEPS steps of TPTrainer (which adds the PreemptionCallback); ``signal_at=(step, signal, rank)`` sends ``signal``
    to ``rank``'s own process as that step begins. Returns how it ended."""
    import logging

    import torch.distributed as dist
    from transformers import TrainerCallback

    from tp_trainer import TPTrainer, TPTrainingArguments
    from tp_trainer.app.resume import resume_point
    class SignalAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if signal_at and state.global_step + 1 == signal_at[0] and dist.get_rank() == signal_at[2]:
                os.kill(os.getpid(), signal_at[1])

    class Lines(logging.Handler):
        lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    for name in ("tp_trainer.preemption", "tp_trainer.app.resume"):
        logging.getLogger(name).addHandler(lines)
    args = TPTrainingArguments(
        output_dir=out, **layout, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        use_cpu=True, disable_tqdm=True)
    trainer = TPTrainer(model=tiny_model("llama"), args=args, train_dataset=make_dataset(N_TRAIN, 3),
                        callbacks=[SignalAt()])  # TPTrainer adds the PreemptionCallback itself
    start = resume_point(resume_value, out)
    exit_code = None
    try:
        trainer.train(resume_from_checkpoint=start.path)
    except SystemExit as stop:
        exit_code = stop.code
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    return {"exit": exit_code, "step": trainer.state.global_step, "start": start.message,
            "weights": full_weights(trainer), "dirs": sorted(os.listdir(out)), "lines": list(lines.lines),
            "handlers_restored": all(h == signal.SIG_DFL for h in handlers.values())}


LAYOUTS = {"tp2_zero1": (dict(tp_size=2, zero_stage=1), signal.SIGTERM, 1),
           "dp2_zero1": (dict(tp_size=1, zero_stage=1), signal.SIGUSR1, 0)}


def preemption_world(base):
    results = {}
    for name, (layout, sig, rank) in LAYOUTS.items():
        results[name] = {
            "ref": train(f"{base}/{name}/ref", layout),
            "preempted": train(f"{base}/{name}/run", layout, signal_at=(SIGNAL_AT, sig, rank)),
            "resumed": train(f"{base}/{name}/run", layout, resume_value="auto")}
    return results


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    return run_distributed(preemption_world, 2, str(tmp_path_factory.mktemp("preemption")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_signal_to_one_rank_saves_and_exits_every_rank_cleanly(preempted, layout):
    sig, target = LAYOUTS[layout][1:]
    for rank, result in enumerate(preempted):
        run = result[layout]["preempted"]
        # both ranks stop after the step the signal arrived in, with status 0, after a complete checkpoint
        assert run["exit"] == 0 and run["step"] == SIGNAL_AT, (rank, run["exit"], run["step"])
        assert run["dirs"] == [f"checkpoint-{SIGNAL_AT}"], run["dirs"]  # save_strategy "no" and still saved
        assert run["handlers_restored"]
        assert result[layout]["ref"]["exit"] is None and result[layout]["ref"]["step"] == STEPS
    lines = preempted[0][layout]["preempted"]["lines"]
    assert (f"preempted ({sig.name} on rank {target}): saved checkpoint-{SIGNAL_AT} at step {SIGNAL_AT} of {STEPS}; "
            "the same command resumes from it") in lines
    assert preempted[1][layout]["preempted"]["lines"] == []  # rank 0 says it, once


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_resumed_run_ends_bit_identical_to_an_uninterrupted_one(preempted, layout):
    ref, resumed = preempted[0][layout]["ref"], preempted[0][layout]["resumed"]
    assert resumed["start"] == f"resuming from step {SIGNAL_AT} (checkpoint-{SIGNAL_AT}; auto)"
    assert resumed["step"] == STEPS and resumed["exit"] is None
    assert ref["weights"].keys() == resumed["weights"].keys()
    for name, want in ref["weights"].items():
        assert torch.equal(resumed["weights"][name], want), name
    # not vacuous: the weights moved during the resumed steps
    moved = [n for n in ref["weights"] if not torch.equal(ref["weights"][n], tiny_model("llama").state_dict()[n])]
    assert moved


# ------------------------------------------------------------------------------------ launched worlds
# tests/scripts/resilient_train.py (what `tp-trainer train` wires in) on 2 ranks (tp=2, ZeRO-1), launched the
# way `tp-trainer train` launches itself: tp_trainer.app.launch.relaunch in a parent process, torch's elastic
# agent under it. 20 steps, a checkpoint every 4 (the last 2 kept); resumed runs must end with the weights
# and the loss curve of the uninterrupted one, bit for bit (fp32 on the CPU, same operations in the same order).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "resilient_train.py")
RUN_STEPS = 20
RELAUNCH = ("import sys; from tp_trainer.app.launch import relaunch; "
            "sys.exit(relaunch(sys.argv[4:], 2, max_restarts=int(sys.argv[1]), shutdown_timeout=int(sys.argv[2]), "
            "output_dir=sys.argv[3], entry=[{script!r}]))")


def launch(out, *, max_restarts=2, shutdown_timeout=30, ddp_timeout=60, env=None):
    """The parent process (``tp-trainer train``'s role) of one launch; its output merged into ``stdout``."""
    import subprocess
    import sys

    argv = ["--output_dir", str(out), "--tp_size", "2", "--zero_stage", "1", "--max_steps", str(RUN_STEPS),
            "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--resume_from_checkpoint", "auto",
            "--ddp_timeout", str(ddp_timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    code = RELAUNCH.format(script=SCRIPT)
    return subprocess.Popen([sys.executable, "-c", code, str(max_restarts), str(shutdown_timeout), str(out), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def final_state(out):
    from safetensors.torch import load_file

    with open(os.path.join(out, "log_history.json")) as f:
        losses = {h["step"]: h["loss"] for h in json.load(f) if "loss" in h}
    return load_file(os.path.join(out, "final", "model.safetensors")), losses


def assert_same_run(out, ref):
    weights, losses = final_state(out)
    want_weights, want_losses = ref
    assert sorted(losses) == list(range(1, RUN_STEPS + 1)) and losses == want_losses
    assert weights.keys() == want_weights.keys()
    for name, want in want_weights.items():
        assert torch.equal(weights[name], want), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, log = finish(launch(out))
    assert code == 0, log[-3000:]
    return final_state(out)


def test_killed_ranks_are_restarted_and_the_run_ends_bit_identical(tmp_path, uninterrupted):
    # first attempt: rank 1 is SIGKILLed as step 7 begins (rank 0 waits in the shared-memory all-reduce);
    # second: rank 0 is SIGKILLed during the save of checkpoint-12, after writing its files, before the manifest
    kills = "7:1:0:step,12:0:1:save"
    code, log = finish(launch(tmp_path, env={"RESILIENCE_KILLS": kills}))
    assert code == 0, log[-3000:]
    starts = [line for line in log.splitlines() if line.startswith("START ")]
    assert starts == [f"START starting from step 0: no complete checkpoint in {tmp_path} (auto)",
                      "START resuming from step 4 (checkpoint-4; restart 1)",
                      "START resuming from step 8 (checkpoint-8; restart 2)"], starts
    assert "waited" in log and "for rank 1 (pid" in log and "has exited" in log  # the first kill, named at once
    assert_same_run(tmp_path, uninterrupted)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-16", "checkpoint-20", "final", "log_history.json"]


def signal_when(proc, first_step, send, then=None):
    """Read ``proc``'s output; at the first ``STEP n`` with ``n >= first_step`` call ``send(proc)``, then
    ``then(line)`` on every later line."""
    import time

    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if sent is not None and then is not None:
            then(line)
        if sent is None and line.startswith("STEP ") and int(line.split()[1]) >= first_step:
            send(proc)
            sent = time.monotonic()
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines), (time.monotonic() - sent) if sent else None


def worker_pids(parent_pid):
    """The workers of a launch: the children of the agent, the parent's child (``pgrep -P``), by rank order."""
    import subprocess

    agent = int(subprocess.check_output(["pgrep", "-P", str(parent_pid)]).split()[0])
    return sorted(int(p) for p in subprocess.check_output(["pgrep", "-P", str(agent)]).split())


def saved_step(out):
    from tp_trainer.app.resume import checkpoint_step, newest_complete_checkpoint

    return checkpoint_step(newest_complete_checkpoint(str(out))[0])


def test_preemption_through_the_launcher_exits_0_and_the_next_launch_continues(tmp_path, uninterrupted):
    slow = {"RESILIENCE_STEP_SLEEP": "0.3"}  # so that the signal lands mid-run
    # 1. SIGTERM to the parent (`tp-trainer train`, as a scheduler sends it): passed to the agent, then the workers
    code, log, took = signal_when(launch(tmp_path, env=slow), 5, lambda p: p.send_signal(signal.SIGTERM))
    first = saved_step(tmp_path)
    assert code == 0, log[-3000:]
    assert 5 <= first < RUN_STEPS and f"checkpoint-{first}" in os.listdir(tmp_path)
    assert (f"tp-trainer train: stopped by SIGTERM after saving checkpoint-{first}; the same command continues "
            f"from step {first}") in log
    assert f"preempted (SIGTERM on rank 0, SIGTERM on rank 1): saved checkpoint-{first}" in log
    assert took < 30, took  # the rest of a step (0.3 s), one save, the agent's 5 s monitor interval
    # 2. SIGUSR1 (SLURM's warning) to rank 1 alone: every rank saves and exits 0, and so does the agent
    code, log, took = signal_when(launch(tmp_path, env=slow), first + 2,
                                  lambda p: os.kill(worker_pids(p.pid)[1], signal.SIGUSR1))
    second = saved_step(tmp_path)
    assert code == 0, log[-3000:]
    assert f"START resuming from step {first} (checkpoint-{first}; auto)" in log
    assert first + 2 <= second < RUN_STEPS and f"preempted (SIGUSR1 on rank 1): saved checkpoint-{second}" in log
    assert "tp-trainer train: stopped by" not in log  # the agent itself succeeded: nothing to translate
    # 3. the same command once more finishes the run, exactly as if it had never stopped
    code, log = finish(launch(tmp_path))
    assert code == 0 and f"START resuming from step {second} (checkpoint-{second}; auto)" in log, log[-3000:]
    assert_same_run(tmp_path, uninterrupted)


def test_a_stopped_rank_fails_the_job_within_the_timeout_naming_it(tmp_path):
    import time

    ddp_timeout, shutdown = 8, 5  # shutdown: the grace after a SIGTERM (not used by a failure's teardown)
    stopped = []

    def stop_rank1(proc):
        stopped.append(worker_pids(proc.pid)[1])
        os.kill(stopped[0], signal.SIGSTOP)

    def resume_once_named(line):  # spares the test torch's fixed 30 s before it SIGKILLs a stopped worker
        if f"rank 1 (pid {stopped[0]}) is stopped" in line:
            os.kill(stopped[0], signal.SIGCONT)

    start = time.monotonic()
    try:
        code, log, took = signal_when(launch(tmp_path, max_restarts=0, shutdown_timeout=shutdown,
                                             ddp_timeout=ddp_timeout, env={"RESILIENCE_STEP_SLEEP": "0.3"}),
                                      3, stop_rank1, resume_once_named)
    finally:
        for pid in stopped:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code != 0, log[-3000:]
    # bounded: the timeout, a liveness check (1 s), the agent's monitor interval (5 s), then up to torch's fixed
    # 30 s between its SIGTERM (which a stopped process does not act on) and its SIGKILL (the test resumes the
    # stopped rank once rank 0 has named it, so it usually exits sooner), plus process exits
    assert ddp_timeout <= took < ddp_timeout + 1 + 5 + 30 + 15, took
    # rank 0 names the stopped rank and the operation, whichever collective it was waiting in: the TP
    # all-reduce (shared memory), the preemption check or one of the Trainer's own (the report's last line)
    assert f"rank 1 (pid {stopped[0]}) is stopped (SIGSTOP or a debugger)" in log, log[-3000:]
    named = [line for line in log.splitlines() if f"rank 1 (pid {stopped[0]}) is stopped" in line][0]
    assert ("shared-memory all_reduce" in named or "shared-memory all_gather" in named
            or "the preemption check's all_reduce" in named or "(torch.distributed), called from" in named), named
    assert f"{ddp_timeout} s" in named and "--ddp_timeout" in named, named
    assert time.monotonic() - start < 300


def lost_peer_report_suite():
    """A collective of torch's own (not wrapped by tp_trainer) times out because rank 1 is stopped: the report
    names the operation, its caller and rank 1's state; a failure that is not a lost peer gets no report."""
    import signal as signals

    import torch.distributed as dist

    from tp_trainer.parallel.collectives import bound_waits
    from tp_trainer.resilience import PeerFailureReport

    import sys

    before = sys.excepthook
    report = PeerFailureReport()
    report.on_train_begin(None, None, None)
    installed = sys.excepthook == report._hook
    bound_waits(3, dist.group.WORLD)
    pids = [identity[1] for identity in report.identities]
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signals.SIGSTOP)
        return {}
    try:
        dist.all_gather([torch.zeros(2), torch.zeros(2)], torch.ones(2))
        line = "no error"
    except RuntimeError as err:
        line = report.report(err)
    finally:
        os.kill(pids[1], signals.SIGCONT)
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as err:
        unrelated = report.report(err)
    report.uninstall()
    return {"line": line, "pid": pids[1], "unrelated": unrelated, "hook": installed and sys.excepthook is before}


def test_a_lost_peer_in_torchs_own_collective_is_named():
    rank0, _ = run_distributed(lost_peer_report_suite, 2)
    line = rank0["line"]
    assert line.startswith("rank 0 gave up on all_gather (torch.distributed), called from tests/test_resilience.py:"), \
        line
    assert "in lost_peer_report_suite (the process group's timeout is 3 s, --ddp_timeout)" in line, line
    assert line.endswith(f"rank 1 (pid {rank0['pid']}) is stopped (SIGSTOP or a debugger)."), line
    assert rank0["unrelated"] is None and rank0["hook"]  # installed for training, the previous one back after


# ------------------------------------------------------------------------------------ two nodes on loopback
def script_argv(out):
    return ["--output_dir", str(out), "--tp_size", "2", "--zero_stage", "1", "--max_steps", str(RUN_STEPS),
            "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--resume_from_checkpoint", "auto",
            "--ddp_timeout", "60"]


def torchrun(out, *launch_args):
    import subprocess
    import sys

    from tp_trainer.app.launch import launcher_env

    cmd = [sys.executable, "-m", "torch.distributed.run", *launch_args, "--monitor-interval", "5", SCRIPT,
           *script_argv(out)]
    env = launcher_env(2, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def node(out, port):
    """One 'node' of the README's multi-node command: 2 processes, c10d rendezvous at 127.0.0.1:port."""
    return torchrun(out, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", "2")


def kill_node(proc):
    """SIGKILL a node: its agent and its workers (each worker runs in a session of its own)."""
    import subprocess

    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_two_nodes_give_the_losses_of_one_and_survive_losing_a_node(tmp_path):
    """tp=2 x dp=2 (ZeRO-1) as two loopback nodes of two processes against four processes on one node: the same
    ranks, groups and operations, so the loss at every step and the final weights are identical bit for bit.
    Node 1 (not the rendezvous host) is killed at step >= 6 and started again; node 0's agent restarts its
    workers, both rejoin, and the run resumes from checkpoint-4 (or later) and ends as if nothing happened."""
    import threading
    import time

    from distributed import free_port

    one_node = tmp_path / "one_node"
    proc = torchrun(one_node, "--standalone", "--nproc-per-node", "4")
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    reference = final_state(one_node)

    out, port = tmp_path / "two_nodes", free_port()
    first = node(out, port)
    time.sleep(1)  # node 0 hosts the rendezvous store
    second = node(out, port)
    drained = []
    drain = threading.Thread(target=lambda: drained.append(second.communicate()[0]), daemon=True)
    drain.start()
    lines, replacement = [], None
    try:
        for line in first.stdout:
            lines.append(line)
            if replacement is None and line.startswith("STEP ") and int(line.split()[1]) >= 6:
                kill_node(second)
                drain.join()
                replacement = node(out, port)
        first.wait(timeout=600)
        replacement_log = replacement.communicate(timeout=120)[0]
    finally:
        for proc in (first, second, replacement):
            if proc is not None and proc.poll() is None:
                kill_node(proc)
    log = "".join(lines)
    assert first.returncode == 0 and replacement.returncode == 0, log[-3000:] + replacement_log[-2000:]
    starts = [line for line in lines if line.startswith("START ")]
    assert len(starts) == 2 and starts[1].startswith("START resuming from step ") and "restart 1)" in starts[1], starts
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------ tp-trainer train resumes
def tp_trainer_train(out, *extra):
    """``tp-trainer train recipes/tiny-sft.yaml`` from a plain shell, tiny (one process, a few seconds of
    training); returns its output and the steps of its log_history.json (step -> loss)."""
    import subprocess
    import sys

    argv = [os.path.join(ROOT, "recipes", "tiny-sft.yaml"), "--output_dir", str(out), "--nproc_per_node", "1",
            "--tp_size", "1", "--zero_stage", "1", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
            "--per_device_train_batch_size", "4", "--generated_train_size", "64", "--generated_eval_size", "8",
            "--max_length", "64", "--eval_after_train", "false", "--disable_tqdm", "true", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "tp_trainer.cli", "train", *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"tp-trainer train {extra} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(out, "log_history.json")) as f:
        losses = {h["step"]: h["loss"] for h in json.load(f) if "loss" in h}
    return proc.stdout + proc.stderr, losses


def test_tp_trainer_train_resumes_from_the_newest_checkpoint_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "out"
    log, first = tp_trainer_train(out, "--max_steps", "4")
    assert "tp_trainer: starting from step 0: no complete checkpoint in" in log
    assert sorted(first) == [1, 2, 3, 4]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]

    log, second = tp_trainer_train(out, "--max_steps", "6")  # resume_from_checkpoint: auto, the recipe's default
    assert "tp_trainer: resuming from step 4 (checkpoint-4; auto)" in log, log[-3000:]
    # the history continues from step 4: steps 1-4 are the first run's (restored from checkpoint-4), then 5, 6
    assert sorted(second) == [1, 2, 3, 4, 5, 6] and {s: second[s] for s in first} == first
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]

    log, third = tp_trainer_train(out, "--max_steps", "2", "--overwrite_output_dir", "true")
    assert "tp_trainer: starting over from step 0: removed 2 checkpoint(s)" in log, log[-3000:]
    assert sorted(third) == [1, 2] and third[1] == first[1]  # the same seed from scratch: the same first step
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2"]
