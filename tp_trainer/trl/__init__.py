"""TRL's trainers under tensor parallelism + ZeRO: ``TPSFTTrainer``/``TPSFTConfig``, ``TPDPOTrainer``/``TPDPOConfig``.

Each is TRL's trainer with :class:`~tp_trainer.trainer.TPTrainerMixin` and TRL's config with
:class:`~tp_trainer.args.TPArgumentsMixin` (``tp_size``, ``zero_stage``, ``tp_plan``, ...). The
per-token log-probabilities and the metrics TRL derives from the logits (entropy, token accuracy,
the mean logit) come from vocab-parallel reductions on the vocabulary-split LM head
(:mod:`.fused_head`); full logits are never built in training.

Requires the ``trl`` extra (``pip install "tp_trainer[trl]"``); importing this package without TRL
is an ImportError that says so.

GRPO is not provided. TRL's GRPOTrainer generates with a different seed on every process
(``set_seed(seed, device_specific=True)``), so the ranks of a TP group would sample different
completions for what must be one batch; and it normalises advantages over the world-wide gather and
slices them back by global ``process_index`` and ``num_processes``, which under TP count every
completion ``tp`` times and hand TP ranks another dp rank's slice. Making it correct means
re-implementing its generation and advantage bookkeeping per dp group, not a few overrides.
"""

from __future__ import annotations

from ..extras import require

require("trl", feature="tp_trainer.trl")

from .dpo import TPDPOConfig, TPDPOTrainer  # noqa: E402
from .sft import TPSFTConfig, TPSFTTrainer  # noqa: E402

__all__ = ["TPDPOConfig", "TPDPOTrainer", "TPSFTConfig", "TPSFTTrainer"]
