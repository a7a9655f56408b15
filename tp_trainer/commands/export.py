"""``tp-trainer export CHECKPOINT_DIR OUT_DIR [--dtype bf16] [--merge-lora [--base-model DIR]]``: an HF model dir.

Runs in this one process, without a training world: the sharded checkpoint's TP shards are
stitched together with the shard layout its manifest records (one full tensor at a time), fp32
master weights are used for an fp32 export of a 16-bit run, and ``OUT_DIR`` gets
``config.json``, ``model.safetensors`` (sharded with an index above ``--max-shard-size``), the
generation config and the tokenizer files found in the checkpoint. The checkpoint is validated
(sizes and sha256 of every file) first. Without ``--dtype`` the dtype is the one the training
run's ``save_model`` would have written.

``--merge-lora``: the checkpoint of a LoRA (PEFT) run holds only the adapters; this loads the base
model (``--base-model DIR``, default the local directory its ``adapter_config.json`` names; nothing
is downloaded) in fp32, merges ``W + s B A`` into every adapted weight and writes the merged full
model (dtype as above). CHECKPOINT_DIR may also be the adapter directory ``save_model`` wrote.
"""

from __future__ import annotations

import argparse
import sys

HELP = "turn a sharded training checkpoint into a Hugging Face model directory (one process)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tp-trainer export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="a checkpoint-N directory written by TPTrainer")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default: what the run's save_model would write)")
    parser.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (5GB)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run's checkpoint (or adapter directory): write the base model with the adapters "
                             "merged in")
    parser.add_argument("--base-model", default=None,
                        help="with --merge-lora: the base model's local directory (default: the one the adapter "
                             "config names)")
    args = parser.parse_args(argv)
    if args.base_model is not None and not args.merge_lora:
        parser.error(f"--base-model {args.base_model} is only used with --merge-lora")

    from ..checkpoint import CheckpointError
    from ..checkpoint.export import export_checkpoint, parse_dtype

    try:
        dtype = export_checkpoint(args.checkpoint_dir, args.out_dir, dtype=parse_dtype(args.dtype),
                                  max_shard_size=args.max_shard_size, merge_lora=args.merge_lora,
                                  base_model=args.base_model)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"tp-trainer export: {err}", file=sys.stderr)
        return 1
    merged = " with the LoRA adapters merged" if args.merge_lora else ""
    print(f"exported {args.checkpoint_dir} -> {args.out_dir}{merged} ({str(dtype).removeprefix('torch.')})")
    return 0
