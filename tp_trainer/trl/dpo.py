"""``TPDPOTrainer``: TRL's ``DPOTrainer`` under tensor parallelism + ZeRO (``TPDPOConfig``: ``DPOConfig`` + the layout).

DPO needs, per sequence, the summed log-probabilities of the completion under the policy and under
the reference model; TRL reads them, and the logged ``entropy``, ``logits/*`` (mean logit) and
``mean_token_accuracy``, from its fused LM head. Both models' heads are replaced by the
vocab-parallel version (:mod:`.fused_head`): per token, one all-gather over the TP group of a few
floats (``log p``'s max and sum, and one per metric), never the ``[tokens, V]`` logits. Everything
after (the DPO loss, ``rewards/*``, ``logps/*``) is TRL's arithmetic on those sums, identical on
every rank of a TP group; its ``accelerator.gather`` of per-pair values spans the world, so every
value appears ``tp`` times and the means it logs are unchanged.

The reference model is sharded like the policy, with the policy's plan when their parameters match:
TRL builds it (``ref_model=None``: loaded from the policy's ``name_or_path``) or takes the one passed,
then hands it to ``accelerator.prepare_model``, where ``TPTrainerMixin.tp_prepare_model`` shards it
and installs its vocab-parallel head before mixed precision wraps its forward. It runs sharded at
every step, under ``no_grad``. With PEFT TRL keeps no reference model (the adapter is disabled instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from trl import DPOConfig, DPOTrainer

from ..args import TPArgumentsMixin
from ..extras import require
from ..trainer import TPTrainerMixin
from .fused_head import causal_lm, install_vocab_parallel_fused_head

DPO_OUTPUTS = ("entropy", "mean_logits", "is_top1")  # what DPOTrainer asks the policy's fused head for


@dataclass
class TPDPOConfig(TPArgumentsMixin, DPOConfig):
    """TRL's ``DPOConfig`` plus ``tp_size``, ``zero_stage``, ``tp_plan``, ... (:class:`~tp_trainer.args.TPArgumentsMixin`)."""


class TPDPOTrainer(TPTrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with TP + ZeRO; policy and reference model sharded alike."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("peft_config") is not None:
            require("peft", feature="peft_config")
        super().__init__(*args, **kwargs)
        self._tp_install_policy_head()

    def _tp_install_policy_head(self) -> None:
        if self.tp_active:  # DPOTrainer.__init__ installs its fused head after Trainer.__init__
            outputs = DPO_OUTPUTS + (("log_sum_sq_probs",) if self.args.use_weighting else ())
            install_vocab_parallel_fused_head(causal_lm(self.model), outputs=outputs)

    def tp_prepare_model(self, model: nn.Module) -> nn.Module:
        if self.tp_active and model is getattr(self, "ref_model", None) and model is not self.model:
            if not self.tp_is_sharded(model):
                self.tp_shard_like_model(model)
            install_vocab_parallel_fused_head(model)  # the reference forward reads log_probs only
        return model

    def compute_ref_log_probs(self, model, inputs):
        # precompute_ref_log_probs runs inside DPOTrainer.__init__, on the policy when there is no reference
        self._tp_install_policy_head()
        return super().compute_ref_log_probs(model, inputs)
