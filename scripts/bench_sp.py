"""Sequence parallelism's memory, measured: per-rank peak of a long-sequence step, and the longest sequence a budget holds.

Usage (docs/benchmarks.md's table comes from exactly this)::

    python scripts/bench_sp.py --out sp.json                       # everything below, peers if installed
    python scripts/bench_sp.py --seq 2048 --short 512 --long 2048 --peers none   # a quick run

One seeded Llama-shaped model (scripts/bench.py's: hidden 512, 8 heads / 4 KV heads, MLP 1376, 4
layers, vocabulary 4096; bf16 weights), trained with AdamW on batch 1 of random token ids; one
``torchrun`` job per measurement, ``--threads`` OpenMP threads per rank. A job runs one warm-up
step, then one step under ``tp_trainer.memory_trace.LiveTensorBytes``: the per-rank peak is the
live tensors at the step's start (parameters, optimizer states) plus the most the step allocates on
top at any moment (activations, temporaries, gradients, communication buffers), on the rank with
the highest peak. Our layouts run with ``--cpu_kernels off`` (SDPA's flash kernel and Hugging
Face's norms, the modules the peers run and the closed forms of ``tp_trainer/memory_theory.py``
count; the CPU attention kernel would keep ``s^2`` probabilities).

1. **Peak at ``--seq`` tokens** (default 4096), tp=2 and tp=4, with and without sequence
   parallelism: the ratio is what sequence parallelism saves at that length.
2. **Longest sequence in a budget**, tp=2: ours with sequence parallelism and without, DeepSpeed
   AutoTP (ZeRO-1, ``tensor_parallel.autotp_size``) and transformers' native TP
   (``DistributedConfig(tp_size=2)``; its ``enable_sequence_parallel`` is "not wired up yet" in
   transformers 5.25), each as scripts/bench.py runs it. Each is measured at ``--short`` and
   ``--long`` tokens (2048, 8192): with fused attention the peak is linear in the tokens, so the
   two points give what one more token costs and the longest sequence that fits each ``--budget``
   per rank (``long + (budget - peak(long)) / slope``). The ratio of ours to each peer is printed.
   The budgets matter: DeepSpeed's default ZeRO buckets (``reduce_bucket_size`` 5e8 elements) add
   about 1 GiB to its peak at every length, which weighs most in a small budget.

Every job's loss is printed; the runners of one length must agree within scripts/bench.py's bf16
tolerance (5e-3), else the run exits non-zero. A peer that cannot run here is reported with its error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run from a checkout without an installed tp_trainer (torchrun's workers too)
    sys.path.insert(0, os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location("tp_trainer_bench", os.path.join(HERE, "bench.py"))
bench = importlib.util.module_from_spec(_spec)
sys.modules["tp_trainer_bench"] = bench
_spec.loader.exec_module(bench)

GIB = 2**30
RUNNERS = ("ours", "ours_sp", "deepspeed_autotp", "hf_native_tp")


# ================================================================================ worker side
class _OurSequenceParallelRun(bench._OurRun):
    """scripts/bench.py's run of our layout, with sequence parallelism."""

    def __init__(self, model_dir, dtype, tp, lr):
        import torch
        from transformers import AutoModelForCausalLM

        from tp_trainer.parallel.context import ParallelContext
        from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel
        from tp_trainer.zero import ShardedOptimizer

        self.ctx = ParallelContext.from_environment(tp, cpu_kernels="off")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        apply_tensor_parallel(model, plan_tensor_parallel(model, tp), self.ctx, sequence_parallel=True)
        model.train()
        self.model = self._forward = model
        self.opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True),
                                    self.ctx, stage=0)
        self.dp_rank, self.dp_size = self.ctx.dp_rank, self.ctx.dp_size


def _make_run(runner: str, model_dir: str, tp: int, lr: float, seq: int):
    import torch

    dtype = torch.bfloat16
    if runner == "ours":
        return bench._OurRun(model_dir, dtype, tp, 0, lr, cpu_kernels="off")
    if runner == "ours_sp":
        return _OurSequenceParallelRun(model_dir, dtype, tp, lr)
    if runner == "hf_native_tp":
        return bench._HFNativeTPRun(model_dir, dtype, tp, lr)
    if runner == "deepspeed_autotp":
        return bench._DeepSpeedAutoTPRun(model_dir, dtype, tp, lr, 1)
    raise ValueError(f"unknown runner {runner!r}")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    cfg = bench.BenchConfig(**json.loads(args.config))
    torch.set_num_threads(cfg.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if args.runner == "deepspeed_autotp":
        import deepspeed  # noqa: F401
    from tp_trainer.memory_trace import LiveTensorBytes

    run = bench._instrument(_make_run(args.runner, args.model_dir, args.tp, cfg.lr, cfg.seq))
    ids = torch.randint(0, cfg.vocab, (1, cfg.seq), generator=torch.Generator().manual_seed(cfg.seed))
    warm = run.step(ids)  # Adam states exist from here on
    at_start = sum(run.memory().values())
    with LiveTensorBytes() as live:
        loss = run.forward_backward(ids)
        run.finish_step()
    record = {"peak": at_start + live.peak, "at_start": at_start, "loss": warm, "second_loss": loss.item()}
    bench.write_records(record, args.result)


# ================================================================================ parent side
def _job(runner: str, tp: int, seq: int, cfg, model_dir: str, workdir: str) -> dict:
    cfg = bench.BenchConfig(**{**asdict(cfg), "seq": seq})
    result = os.path.join(workdir, f"{runner}_tp{tp}_{seq}.json")
    print(f"[bench_sp] {runner} tp={tp} seq={seq}", flush=True)
    records = bench.launch_workers(os.path.abspath(__file__), tp, cfg.threads, result,
                                   ["--runner", runner, "--tp", str(tp), "--model-dir", model_dir,
                                    "--config", json.dumps(asdict(cfg))], what=f"{runner} tp={tp} seq={seq}")
    return {"runner": runner, "tp": tp, "seq": seq, "peak": max(r["peak"] for r in records),
            "at_start": max(r["at_start"] for r in records), "loss": records[0]["loss"]}


def _peer_available(runner: str) -> str | None:
    """``None`` when the peer's library imports, else why not."""
    module = {"deepspeed_autotp": "deepspeed", "hf_native_tp": "transformers.distributed"}.get(runner)
    if module is None:
        return None
    try:
        importlib.import_module(module)
        return None
    except Exception as err:  # report it, never skip silently
        return f"{type(err).__name__}: {err}"


def _check_losses(rows: list[dict]) -> list[str]:
    """Runners of one length started from the same weights and batch: their first losses agree."""
    problems = []
    for seq in sorted({r["seq"] for r in rows}):
        same = [r for r in rows if r["seq"] == seq and "loss" in r]
        if same and max(r["loss"] for r in same) - min(r["loss"] for r in same) > bench.LOSS_TOL["bf16"]:
            problems.append(f"seq {seq}: losses disagree: " + ", ".join(f"{r['runner']} tp{r['tp']} {r['loss']:.5f}"
                                                                        for r in same))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="tokens of the step of part 1")
    parser.add_argument("--short", type=int, default=2048, help="part 2's first length")
    parser.add_argument("--long", type=int, default=8192, help="part 2's second length")
    parser.add_argument("--budget", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="part 2's per-rank budgets, GiB")
    parser.add_argument("--vocab", type=int, default=bench.BenchConfig.vocab, help="the model's vocabulary")
    parser.add_argument("--hidden", type=int, default=bench.BenchConfig.hidden, help="the model's hidden size")
    parser.add_argument("--layers", type=int, default=bench.BenchConfig.layers, help="the model's layers")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="part 1's TP sizes")
    parser.add_argument("--peers", nargs="+", default=["deepspeed_autotp", "hf_native_tp"],
                        help="part 2's peers, or 'none'")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    parser.add_argument("--out", help="write every measurement as JSON")
    bench.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        args.tp = args.tp[0]
        worker(args)
        return 0
    peers = [] if args.peers == ["none"] else args.peers
    cfg = bench.BenchConfig(seq=args.seq, batch=1, threads=args.threads, vocab=args.vocab, hidden=args.hidden,
                            layers=args.layers)
    rows, missing = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "model")
        bench._write_model(bench.BenchConfig(**{**asdict(cfg), "seq": max(args.seq, args.long)}), model_dir)
        for tp in args.tp:  # part 1
            for runner in ("ours", "ours_sp"):
                rows.append({**_job(runner, tp, args.seq, cfg, model_dir, workdir), "part": 1})
        for runner in ("ours", "ours_sp", *peers):  # part 2
            why = _peer_available(runner)
            for seq in (args.short, args.long):
                if why is None:
                    try:
                        rows.append({**_job(runner, 2, seq, cfg, model_dir, workdir), "part": 2})
                        continue
                    except RuntimeError as err:
                        why = str(err).strip().splitlines()[-1]
                missing[runner] = why
                break
    report = _report(rows, missing, args)
    print(report["text"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "unavailable": missing, "longest": report["longest"],
                       "config": asdict(cfg), "args": vars(args)}, f, indent=1)
    problems = _check_losses(rows)
    problems += [f"{r}: the peak did not grow with the sequence" for r, fits in report["longest"].items()
                 if None in fits.values()]
    for p in problems:
        print(f"[bench_sp] LOSS MISMATCH {p}", file=sys.stderr)
    return 1 if problems else 0


def _report(rows: list[dict], missing: dict, args) -> dict:
    lines = [f"part 1: per-rank peak of one step, batch 1 x {args.seq} tokens, bf16"]
    for tp in args.tp:
        got = {r["runner"]: r for r in rows if r["part"] == 1 and r["tp"] == tp}
        if {"ours", "ours_sp"} <= got.keys():
            off, on = got["ours"]["peak"], got["ours_sp"]["peak"]
            lines.append(f"  tp={tp}: without SP {off / GIB:.3f} GiB, with SP {on / GIB:.3f} GiB "
                         f"(with / without {on / off:.2f}; states at the step's start {got['ours']['at_start'] / GIB:.3f} GiB)")
    lines.append(f"part 2: tp=2, peak at {args.short} and {args.long} tokens; longest sequence per rank budget")
    longest: dict[str, dict[float, int]] = {}
    for runner in RUNNERS:
        pts = {r["seq"]: r for r in rows if r["part"] == 2 and r["runner"] == runner}
        if runner in missing:
            lines.append(f"  {runner:<18} did not run: {missing[runner]}")
            continue
        if len(pts) < 2:
            continue
        short, long = pts[args.short], pts[args.long]
        slope = (long["peak"] - short["peak"]) / (args.long - args.short)
        longest[runner] = {b: int(args.long + (b * GIB - long["peak"]) / slope) if slope > 0 else None
                           for b in args.budget}
        fits = ", ".join(f"{b:g} GiB: {n}" for b, n in longest[runner].items())
        lines.append(f"  {runner:<18} {short['peak'] / GIB:.3f} -> {long['peak'] / GIB:.3f} GiB "
                     f"(+{(long['peak'] - short['peak']) / 1e9:.2f} GB, {slope / 1024:.1f} KiB per token); "
                     f"longest: {fits} tokens")
    for peer in ("ours", "deepspeed_autotp", "hf_native_tp"):
        if "ours_sp" in longest and peer in longest:
            ratios = ", ".join(f"{b:g} GiB {longest['ours_sp'][b] / longest[peer][b]:.2f}x"
                               for b in args.budget if longest["ours_sp"][b] and longest[peer][b] and longest[peer][b] > 0)
            lines.append(f"  ours with SP / {peer}: {ratios}")
    return {"text": "\n".join(lines), "longest": longest}


if __name__ == "__main__":
    sys.exit(main())
