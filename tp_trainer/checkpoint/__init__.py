"""Sharded, atomic, re-partitionable training checkpoints (``save_steps``, ``resume_from_checkpoint``).

A checkpoint ``checkpoint-N/`` written by a run with ``tp`` x ``dp`` ranks holds::

    tp_checkpoint.json               manifest, written last: topology, per-tensor shard layout,
                                     versions, sha256 + size of every other file
    model-tp{t}-of-{tp}.safetensors  TP rank t's local parameter shards (HF names), written by
                                     the dp-rank-0 process of TP rank t; replicated tensors and
                                     persistent buffers are read from t = 0
    optim-rank{r}.safetensors        rank r's optimizer state pieces, key "NAME::KEY" -> the 1-D
                                     slice [lo, hi) of NAME's flat *local* tensor (ZeRO-1/2: the
                                     rank's partition; ZeRO-0: only dp rank 0 writes); "::master"
                                     holds the fp32 master when the parameter is 16-bit
    optimizer_groups.pt              hyper-parameters of the optimizer's param groups
    rng_state_{r}.pth                per-rank RNG states (python, numpy, torch, accelerator)
    scheduler.pt, scaler.pt, trainer_state.json, training_args.bin, config.json,
    generation_config.json, tokenizer files (rank 0)

Every rank writes its own files in parallel; nothing is gathered to rank 0 but file checksums.

**Re-partitioning.** A piece ``(rank, tp_rank, lo, hi)`` of parameter ``NAME`` is placed in the
flat local tensor of the old ``tp_rank``; the old ShardSpec (segments recorded in the manifest)
``unshard``s the ``tp`` local tensors into the full HF tensor; the new run's ShardSpec
``shard``s it again and each rank keeps the flat range its own ZeRO partition owns. So a
checkpoint loads at any tp, dp and ZeRO stage, and into a plain ``Trainer`` (tp=1, zero 0).

**Atomicity.** Files go to ``.tmp-checkpoint-N`` (a name neither ``get_last_checkpoint`` nor
rotation matches), are fsynced, the manifest is written last, and the directory is renamed to
``checkpoint-N`` in one ``rename``. A save killed at any point leaves the previous checkpoints
as they were; the next save deletes the stale temporary directory. Rotation only counts complete
checkpoints and never deletes the newest complete one nor the best one.

**Validation.** Before anything is modified, every file is checked (existence, size, sha256;
the hashing is split over the ranks) and the model's tensor names and full shapes are compared
with the manifest; an error names the offending file or tensor, on every rank.
"""

from .layout import (MANIFEST, CheckpointError, CheckpointSaveError, is_complete, is_sharded_checkpoint,
                     unwrap_optimizer)
from .load import (CheckpointReader, HFCheckpointReader, load_model_weights, load_optimizer_state, load_scheduler,
                   open_trainer_checkpoint, refresh_master_weights, restore_rng_state)
from .save import check_writable, rotate_checkpoints, save_training_checkpoint, write_checkpoint, write_model_metadata

__all__ = ["MANIFEST", "CheckpointError", "CheckpointReader", "CheckpointSaveError", "HFCheckpointReader",
           "check_writable", "is_complete", "is_sharded_checkpoint", "load_model_weights", "load_optimizer_state",
           "load_scheduler",
           "open_trainer_checkpoint", "refresh_master_weights", "restore_rng_state", "rotate_checkpoints",
           "save_training_checkpoint", "unwrap_optimizer", "write_checkpoint", "write_model_metadata"]
