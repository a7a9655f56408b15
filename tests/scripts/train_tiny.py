"""A user's training script: only Trainer -> TPTrainer and the flags change (launched by tests/test_launchers.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import HfArgumentParser  # noqa: E402

from models import tiny_model  # noqa: E402
from test_trainer import make_dataset  # noqa: E402
from tp_trainer import TPTrainer, TPTrainingArguments  # noqa: E402

(args,) = HfArgumentParser(TPTrainingArguments).parse_args_into_dataclasses()
trainer = TPTrainer(model=tiny_model("llama"), args=args, train_dataset=make_dataset(32, 3))
trainer.train()
if trainer.is_world_process_zero():
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "grad_norm" in h]
    print("RESULT", trainer.tp_context.tp_size, trainer.tp_context.dp_size, losses, flush=True)
