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
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from distributed import run_distributed
from models import tiny_model

pytestmark = pytest.mark.cpu_only(reason="the worlds train with use_cpu=True and signal processes on this host")

STEPS, SIGNAL_AT, N_TRAIN, SEQ = 8, 4, 64, 16


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
def make_dataset(n, seed):
    import datasets

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 93, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ)) % 93 + 3
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def full_weights(trainer):
    from tp_trainer.parallel.gather import iter_full_state

    tp_group = trainer.tp_context.tp_group if trainer.tp_active else None
    return {n: t.detach().clone() for n, t in iter_full_state(trainer.model, tp_group)}


def train(out, layout, *, signal_at=None, resume_value="none"):
    """One run of STEPS steps with the PreemptionCallback; ``signal_at=(step, signal, rank)`` sends ``signal``
    to ``rank``'s own process as that step begins. Returns how it ended."""
    import logging

    import torch.distributed as dist
    from transformers import TrainerCallback

    from tp_trainer import TPTrainer, TPTrainingArguments
    from tp_trainer.app.resume import resume_point
    from tp_trainer.preemption import PreemptionCallback

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
    preemption = PreemptionCallback()
    trainer = TPTrainer(model=tiny_model("llama"), args=args, train_dataset=make_dataset(N_TRAIN, 3),
                        callbacks=[preemption, SignalAt()])
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
