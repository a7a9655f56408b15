"""``tp-trainer plan MODEL --tp-size N --verify``: one real training step of the plan, on the CPU, against the unsharded model.

The meta-device check of :func:`~tp_trainer.planner.validate.validate_plan` proves that the
shapes fit; it cannot see a split that fits but computes the wrong thing (a norm fed split
activations whose gradient is not summed, a fused projection cut across heads, a gradient summed
twice). This check runs the numbers, before any GPU is rented:

1. The model's config is truncated (:mod:`.config`): 2 layers (one per layer type), a vocabulary
   of about 1024 with the same remainder modulo ``tp``, dropout off; widths and head counts kept.
   The parent plans the truncated model (with the user's plan) as ``plan_tensor_parallel`` would
   (:mod:`.check`).
2. ``tp`` fresh interpreters run on the CPU (gloo on ``127.0.0.1``, one thread each), started
   early so that their imports overlap the parent's planning (:mod:`.workers`). Rank 0 builds
   random fp32 weights with the real modeling code and shares them with the others through one
   mapped file (:mod:`.weights`). Rank 0 runs one forward/backward of the unsharded model
   (``[2, 32]`` random tokens, labels = inputs) with every core while the others wait; then every
   rank applies the plan, exactly as training does, and runs the same step (:mod:`.step`).
3. Compared on rank 0 with the unsharded run (:mod:`.compare`, which also states the thresholds):
   the loss, the logits, the output of every module in call order, and every gradient; the
   result, its report and its PASS / FAIL / ERROR verdict are in :mod:`.report`.

Modules: ``config`` (truncation, plan comparison), ``check`` (the parent: :func:`verify_plan`),
``workers`` (the processes and their files), ``weights`` (the shared random weights), ``step``
(one rank's reference and TP steps), ``compare`` (differences and thresholds), ``report``
(result and verdict).
"""

from .check import BATCH, SEED, SEQ_LEN, verify_plan
from .compare import GRAD_RTOL, LOGITS_RTOL, LOSS_RTOL, OUTPUT_RTOL, TensorDiff
from .config import LAYER_COUNT_KEYS, LAYERS, VOCAB, collapsed_entries, meta_model, plan_differences, truncate_config
from .report import PLAN_STAGES, TOP, TRACEBACK_LINES, VerifyResult
from .workers import GRACE_S, VerifyRanks, start_ranks

__all__ = [
    "BATCH", "GRACE_S", "GRAD_RTOL", "LAYERS", "LAYER_COUNT_KEYS", "LOGITS_RTOL", "LOSS_RTOL", "OUTPUT_RTOL",
    "PLAN_STAGES", "SEED", "SEQ_LEN", "TOP", "TRACEBACK_LINES", "VOCAB", "TensorDiff", "VerifyRanks", "VerifyResult",
    "collapsed_entries", "meta_model", "plan_differences", "start_ranks", "truncate_config", "verify_plan",
]
