"""A training script with what ``tp-trainer train`` wires in for issue 21, driven by tests/test_resilience.py.

Each worker: ``TPTrainer`` (which adds ``tp_trainer.resilience.resilience_callbacks()`` and bounds the process groups'
waits bounded by ``--ddp_timeout`` (``collectives.bound_waits``), and the start decided by
``tp_trainer.app.resume.resume_point`` (``--resume_from_checkpoint auto|PATH|none``); rank 0 prints
``START <decision>``, ``STEP <n>`` after every optimizer step, and at the end saves ``OUTPUT_DIR/final``
and ``OUTPUT_DIR/log_history.json``.

Faults, injected by environment variables:

* ``RESILIENCE_KILLS="STEP:RANK:ATTEMPT:WHERE,..."``: on restart ``ATTEMPT`` (``TORCHELASTIC_RESTART_COUNT``)
  rank ``RANK`` kills itself with SIGKILL as step ``STEP`` begins (``WHERE=step``) or right after writing
  its files of ``checkpoint-STEP``, before the manifest (``WHERE=save``);
* ``RESILIENCE_STEP_SLEEP=SECONDS`` after every step, so that a signal sent from outside lands mid-run.
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import HfArgumentParser, TrainerCallback  # noqa: E402

from models import tiny_model  # noqa: E402
from tp_trainer import TPTrainer, TPTrainingArguments  # noqa: E402
from tp_trainer.app.resume import resume_point  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ["RANK"])
KILLS = [tuple(k.split(":")) for k in os.environ.get("RESILIENCE_KILLS", "").split(",") if k]
KILLS = [(int(step), int(rank), int(attempt), where) for step, rank, attempt, where in KILLS
         if int(attempt) == ATTEMPT and int(rank) == RANK]


def make_dataset(n, seq=16):
    import datasets
    import torch

    g = torch.Generator().manual_seed(3)
    start = torch.randint(0, 93, (n, 1), generator=g)
    ids = (start + torch.arange(seq)) % 93 + 3
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


class Faults(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if any(where == "step" and step == state.global_step + 1 for step, _, _, where in KILLS):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        if RANK == 0:
            print(f"STEP {state.global_step}", flush=True)
        time.sleep(float(os.environ.get("RESILIENCE_STEP_SLEEP", "0")))


def kill_while_saving(steps):
    from tp_trainer.checkpoint import save

    write = save._write_rank_files

    def write_then_die(tmp, model, optimizer, ctx):
        out = write(tmp, model, optimizer, ctx)
        if any(tmp.endswith(f"checkpoint-{step}") for step in steps):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    save._write_rank_files = write_then_die


(args,) = HfArgumentParser(TPTrainingArguments).parse_args_into_dataclasses()
kill_while_saving([step for step, _, _, where in KILLS if where == "save"])
trainer = TPTrainer(model=tiny_model("llama"), args=args, train_dataset=make_dataset(256),
                    callbacks=[Faults()])  # TPTrainer adds resilience_callbacks() and bounds its groups' waits
start = resume_point(args.resume_from_checkpoint, args.output_dir)
if RANK == 0:
    print(f"START {start.message}", flush=True)
trainer.train(resume_from_checkpoint=start.path)
trainer.save_model(os.path.join(args.output_dir, "final"))
if trainer.is_world_process_zero():
    with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    print("DONE", flush=True)
