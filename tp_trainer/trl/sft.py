"""``TPSFTTrainer``: TRL's ``SFTTrainer`` under tensor parallelism + ZeRO (``TPSFTConfig``: ``SFTConfig`` + the layout).

TRL computes the loss and the logged ``entropy`` and ``mean_token_accuracy`` from its fused LM head
(``model(..., fused_lm_head=True)``: per-token log-probability, entropy and top-1 of the label). Once
TRL has installed it, the vocab-parallel version replaces it (:mod:`.fused_head`): one all-gather over
the TP group of 5 floats per token (each rank's max logit, sum of exponentials and target logit, and
the partial sums of the entropy and the top-1), never the ``[tokens, V]`` logits. ``num_tokens`` counts
the attention mask gathered over the dp group only (``TPAccelerator.gather_for_metrics``), so each
token once. The loss is TRL's ``sum(-log p) / num_items_in_batch`` times ``dp`` (its
``num_processes // get_tp_size()``), averaged over dp by the ZeRO optimizer: the global token mean.

Dataset preparation is TRL's, unchanged (tokenisation, chat templates, packing, completion-only and
assistant-only loss masks): it builds the batches, and every rank of a TP group receives the same.
The paths that need full logits (``compute_loss_func``, label smoothing, ``return_outputs``) get them
from the head's gather (:class:`~tp_trainer.parallel.layers.ParallelLMHead` without labels).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from ..args import TPArgumentsMixin
from ..extras import require
from ..trainer import TPTrainerMixin
from .fused_head import causal_lm, install_vocab_parallel_fused_head

SFT_OUTPUTS = ("entropy", "is_top1")  # what SFTTrainer asks its fused head for, besides log_probs


@dataclass
class TPSFTConfig(TPArgumentsMixin, SFTConfig):
    """TRL's ``SFTConfig`` plus ``tp_size``, ``zero_stage``, ``tp_plan``, ... (:class:`~tp_trainer.args.TPArgumentsMixin`)."""


class TPSFTTrainer(TPTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with TP + ZeRO; the model is sharded after TRL applied ``peft_config``."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("peft_config") is not None:
            require("peft", feature="peft_config")
        super().__init__(*args, **kwargs)
        if self.tp_active:  # SFTTrainer.__init__ installed its fused head last: replace it
            install_vocab_parallel_fused_head(causal_lm(self.model), outputs=SFT_OUTPUTS)
