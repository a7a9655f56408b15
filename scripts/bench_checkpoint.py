"""Checkpoint figures: save / validate+load / re-partitioned load / save_model / export, times and sizes.

    torchrun --monitor-interval 5 --nproc-per-node 2 scripts/bench_checkpoint.py [--tp 2] [--zero 1] [--out DIR]

Trains a Llama-shaped model (the benchmark's default shape) for one step so the optimizer has
state, then times on every rank: ``_save_checkpoint`` (sharded, atomic), ``save_model`` (bf16,
gathered), loading the checkpoint back into a fresh trainer at the same layout (validation with
sha256 of every file + weights + optimizer state), and, on rank 0 alone, the re-partitioned
read of the full model at tp=1 and ``tp-trainer export``. Prints a table (rank 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch
import torch.distributed as dist


def build(args, out):
    import datasets
    import transformers as T

    from tp_trainer import TPTrainer, TPTrainingArguments

    cfg = T.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=4096)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 4096, (16, 128))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    targs = TPTrainingArguments(output_dir=out, tp_size=args.tp, zero_stage=args.zero, per_device_train_batch_size=2,
                                max_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                gather_16bit_weights_on_model_save=True)
    return TPTrainer(model=model, args=targs, train_dataset=data)


def timed(fn, *, collective=True):
    sync = collective and dist.is_initialized()
    if sync:
        dist.barrier()
    start = time.perf_counter()
    fn()
    if sync:
        dist.barrier()
    return time.perf_counter() - start


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--out", default="/tmp/tp_trainer_bench_checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        shutil.rmtree(args.out, ignore_errors=True)
    trainer = build(args, args.out)
    trainer.train()
    ckpt = os.path.join(args.out, "checkpoint-1")
    rows = {"save checkpoint (sharded, atomic)": timed(lambda: trainer._save_checkpoint(trainer.model, None)),
            "save_model (bf16, gathered)": timed(lambda: trainer.save_model(os.path.join(args.out, "model")))}
    fresh = build(args, args.out + "-resume")
    fresh.create_optimizer_and_scheduler(num_training_steps=1)

    def load():
        fresh._load_from_checkpoint(ckpt)
        fresh._load_optimizer_and_scheduler(ckpt)

    rows["validate + load (same layout)"] = timed(load)
    if rank == 0:
        from tp_trainer.checkpoint import CheckpointReader
        from tp_trainer.checkpoint.export import export_checkpoint

        def full_read():
            reader = CheckpointReader.open(ckpt)
            for name in reader.tensors:
                reader.full_tensor(name)
                for key in reader.state_keys(name):
                    reader.full_state(name, key)

        rows["re-partition to full tensors (1 process)"] = timed(full_read, collective=False)
        rows["tp-trainer export (bf16, 1 process)"] = timed(
            lambda: export_checkpoint(ckpt, os.path.join(args.out, "export"), dtype=torch.bfloat16), collective=False)
        params = sum(p.numel() for p in trainer.model.parameters())
        print(f"\nLlama 512x4 layers, vocab 4096, tp={args.tp} zero={args.zero}, world={trainer.args.world_size}; "
              f"local params on rank 0: {params:,}")
        model_dir = os.path.join(args.out, "model")
        print(f"checkpoint size {du(ckpt) / 2**20:.1f} MiB, save_model dir {du(model_dir) / 2**20:.1f} MiB")
        for name, secs in rows.items():
            print(f"  {name:<45} {secs:7.2f} s")


if __name__ == "__main__":
    main()
