"""Where does a tp=2 step spend its time beyond the halved matmuls? Profile single vs tp=2, side by side.

Usage::

    python scripts/profile_step.py                      # bf16, the benchmark's model and batch
    python scripts/profile_step.py --dtype fp32 --steps 5

Trains the model of ``scripts/bench.py`` (same config flags, same initial weights, same
optimizer: fused AdamW wrapped in ``ShardedOptimizer``) once in a single process and once as
tp=2 under ``torchrun --monitor-interval 5`` with ``OMP_NUM_THREADS`` threads per rank, and
profiles ``--steps`` steps after ``--warmup`` steps (default 4: a CPU rank's heap keeps growing,
and first-touch page faults cost a tp=2 step up to 85% for its first 2-3 steps, see
``tp_trainer/parallel/host.py``) with ``torch.profiler`` (CPU). Per step it
reports, for the single process halved (a perfect tp=2 rank would do exactly half of its
work) and for the slowest tp=2 rank:

* phases (wall time): forward, backward, gradient sync + clipping, optimizer step (+ zero_grad);
* kernels (CPU time): matmuls (``mm``/``addmm``/``bmm``), attention (SDPA), the TP all-reduces
  and all-gathers (``tp_trainer::all_reduce``/``all_gather``: the transport plus waiting for the
  peer rank; the all-gathers are the token-split norms' of ``norms.py``), and the rest
  (norms, residual adds, activations, rotary, loss, the optimizer kernels, Python).

The last column, tp2 minus single/2, is the overhead to remove. Profiler instrumentation costs a
few percent on small ops and distorts large ones: the profiler's own records keep growing the
heap, so some activation buffers land on fresh pages and pay first-touch faults on every step
(the tp=2 loss's softmax on the 1024 x 2048 bf16 block: 22 ms profiled, with 4,096 faults, and
1.3 ms with none in an unprofiled steady step, counted with ``getrusage``). Read the table's
shape, not its digits; ``scripts/bench.py`` gives the unprofiled step times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the model, batch and runner of the benchmark)

PHASES = ("forward", "backward", "grad sync + clip", "optimizer step")
MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")  # addmm_: sibling input grads


def _categories(prof, steps: int) -> dict:
    """CPU milliseconds per step by kind, from the profiler's per-op averages."""
    events = prof.key_averages()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    total_ms = {e.key: e.cpu_time_total / 1e3 / steps for e in events}
    out = {"matmul": sum(v for k, v in self_ms.items() if k in MATMUL),
           "attention (SDPA)": sum(v for k, v in self_ms.items() if "scaled_dot_product" in k),
           "TP all-reduce (incl. wait)": total_ms.get("tp_trainer::all_reduce", 0.0),
           "TP all-gather (incl. wait)": total_ms.get("tp_trainer::all_gather", 0.0)}
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    cfg = bench.BenchConfig(**json.loads(args.config))
    torch.set_num_threads(cfg.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    run = bench._instrument(bench._OurRun(args.model_dir, dtype, world, 0, cfg.lr))
    warmup = cfg.warmup
    for step in range(warmup):
        run.step(bench._batch(cfg, step, run.dp_rank, run.dp_size))
    phases = {name: 0.0 for name in PHASES}
    walls = []

    def timed(name, fn):
        t0 = time.perf_counter()
        with record_function(name):
            out = fn()
        phases[name] += (time.perf_counter() - t0) * 1e3 / cfg.steps
        return out

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(warmup, warmup + cfg.steps):
            ids = bench._batch(cfg, step, run.dp_rank, run.dp_size)
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            loss = timed("forward", lambda: run.model(input_ids=ids, labels=ids).loss)
            timed("backward", loss.backward)
            timed("grad sync + clip", lambda: (run.opt.finish_grad_sync(), run.opt.clip_grad_norm(1.0)))
            timed("optimizer step", lambda: (run.opt.step(), run.opt.zero_grad()))
            loss.item()
            walls.append((time.perf_counter() - t0) * 1e3)
    kernels = _categories(prof, cfg.steps)
    ops = {e.key: [e.self_cpu_time_total / 1e3 / cfg.steps, e.count / cfg.steps] for e in prof.key_averages()}
    record = {"phases": phases, "kernels": kernels, "ops": ops, "step": sum(walls) / len(walls)}
    bench.write_records(record, args.result)


def _launch(world: int, cfg, dtype: str, model_dir: str, workdir: str) -> list[dict]:
    result = os.path.join(workdir, f"profile_{world}.json")
    return bench.launch_workers(os.path.abspath(__file__), world, cfg.threads, result,
                                ["--dtype", dtype, "--model-dir", model_dir, "--config", json.dumps(asdict(cfg))],
                                what=f"profile run on {world} rank(s)")


def format_ops(single: dict, tp2: list[dict], top: int) -> str:
    """The ``top`` ops whose self CPU time per step exceeds single/2 the most on the slowest tp=2 rank,
    with their call counts (a count that does not halve is per-op overhead that TP does not split)."""
    slowest = max(tp2, key=lambda r: r["step"])
    names = set(single["ops"]) | set(slowest["ops"])
    rows = []
    for name in names:
        (a, na), (b, nb) = single["ops"].get(name, [0.0, 0]), slowest["ops"].get(name, [0.0, 0])
        rows.append((b - a / 2, name, a / 2, b, na, nb))
    rows.sort(reverse=True)
    lines = [f"-- ops, self CPU ms per step (top {top} by tp2 - single/2)",
             f"{'':<44}{'single/2':>10}{'tp2':>10}{'diff':>9}{'calls 1':>9}{'calls tp2':>10}"]
    lines += [f"{name[:43]:<44}{a:>10.2f}{b:>10.2f}{d:>+9.2f}{na:>9.0f}{nb:>10.0f}" for d, name, a, b, na, nb in rows[:top]]
    total_calls = (sum(c for _, c in single["ops"].values()), sum(c for _, c in slowest["ops"].values()))
    lines.append(f"op calls per step: single {total_calls[0]:.0f}, tp2 {total_calls[1]:.0f}")
    return "\n".join(lines)


def format_report(single: dict, tp2: list[dict], dtype: str) -> str:
    slowest = max(tp2, key=lambda r: r["step"])
    rows = [(name, single["phases"][name] / 2, slowest["phases"][name]) for name in PHASES]
    rows.append(("step (wall)", single["step"] / 2, slowest["step"]))
    kernel_rows = [(name, single["kernels"][name] / 2, slowest["kernels"][name]) for name in single["kernels"]]
    rest_single = single["step"] - sum(single["kernels"].values())
    rest_tp2 = slowest["step"] - sum(slowest["kernels"].values())
    kernel_rows.append(("everything else", rest_single / 2, rest_tp2))
    lines = [f"{dtype}: ms per step; single/2 = the ideal share of a tp=2 rank; tp2 = its slowest rank",
             f"{'':<30}{'single/2':>10}{'tp2':>10}{'tp2 - single/2':>16}"]
    for title, block in (("phases", rows), ("kernels", kernel_rows)):
        lines.append(f"-- {title}")
        lines += [f"{name:<30}{a:>10.1f}{b:>10.1f}{b - a:>+16.1f}" for name, a, b in block]
    lines.append(f"tp2 step / (single step / 2) = {slowest['step'] / (single['step'] / 2):.3f} (profiled)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = bench.BenchConfig(steps=3, warmup=4)
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--top", type=int, default=0, help="also list the N ops that exceed single/2 the most")
    bench.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cfg = bench.BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "model")
        bench._write_model(cfg, model_dir)
        single = _launch(1, cfg, args.dtype, model_dir, workdir)[0]
        tp2 = _launch(2, cfg, args.dtype, model_dir, workdir)
    print(format_report(single, tp2, args.dtype))
    if args.top:
        print(format_ops(single, tp2, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
