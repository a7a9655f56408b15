"""ZeRO-3 at tp=2 x dp=2: bytes per rank against the theory, the peak of a step against the estimate, the step time
against ZeRO-1 at the same layout and against DeepSpeed's ZeRO-3 + AutoTP.

Usage (docs/benchmarks.md's ZeRO-3 section comes from exactly this)::

    python scripts/bench_zero3.py --rounds 3 --out bench_zero3.json
    python scripts/bench_zero3.py --dtypes bf16 --rounds 1 --steps 3 --warmup 2 --peers none   # a quick look

The model, batches, optimizer (fused AdamW, weight decay 0, clipping at 1.0) and step timing are
``scripts/bench.py``'s (its Llama of hidden 512, 4 layers, vocabulary 4096; batch 4 x 256 per step,
split over dp): one ``torchrun`` job of 4 ranks per (runner, dtype, round), the rounds interleaved,
a step's time its slowest rank's. The runners:

* ``zero3``: ``zero.shard_parameters_over_dp`` + ``FullyShardedOptimizer`` on the TP-sharded model;
* ``zero1``: ``ShardedOptimizer(stage=1)`` at the same layout (bench.py's ``tp2xdp2``);
* ``deepspeed_zero3_autotp`` (when deepspeed is importable): ``zero_optimization.stage = 3`` with
  ``tensor_parallel.autotp_size = 2``, its defaults otherwise (params under 1e5 elements stay
  gathered: ``stage3_param_persistence_threshold``).

Reported, per dtype:

* bytes per rank (ZeRO-3, every rank, after backward of an untimed step): fp32 parameter shards,
  fp32 gradient shards and AdamW's states, each storage once, against the ideal ``16 P / dp`` (``P``
  the local TP elements of the rank) and against the exact theory with FSDP2's padding (each
  shard's storage has ``ceil(rows / dp)`` rows);
* the peak of a step (ZeRO-3): the live tensors at the start of a step plus the most the step
  allocates on top (``tp_trainer.memory_trace.LiveTensorBytes``), against ``tp-trainer estimate``
  (``tp_trainer.memory.estimate_memory(zero=3)``) where it covers stage 3, and against a closed
  form: persistent (parameters + optimizer) + the activations ``estimate_memory`` simulates for the
  same TP forward (``zero=1``) + one unit in flight (``(2 b + 4) U``: the unit gathered in the
  compute dtype, its gradients, the fp32 reduce-scatter input; ``U`` the largest unit's local TP
  elements);
* the median step time of each runner and the ratios ``zero3 / zero1`` and ``zero3 / deepspeed``
  (median over rounds of the per-round ratio of medians), with the loss gate: every runner's per-step
  loss must equal ZeRO-1's within ``bench.LOSS_TOL``, else its time is not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the model, batches, launcher and record format of the benchmark)

TP, DP = 2, 2
RUNNERS = ("zero3", "zero1")
PEER = "deepspeed_zero3_autotp"


# ================================================================================ worker side
class _Zero3Run(bench._OurRun):
    """tp_trainer's ZeRO-3 at tp x dp on this rank: bench.py's run of our layout, sharded over dp by FSDP2."""

    def __init__(self, model_dir, dtype, lr, cpu_kernels):
        super().__init__(model_dir, dtype, TP, 3, lr, cpu_kernels=cpu_kernels)

    def _over_dp(self, model, lr, zero):
        import torch

        from tp_trainer.zero import FullyShardedOptimizer, shard_parameters_over_dp

        model = shard_parameters_over_dp(model, self.ctx)
        adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        return model, FullyShardedOptimizer(adamw, self.ctx)

    def memory(self) -> dict:
        params = [p.to_local() for p in self.model.parameters()]
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        states = [t for s in self.opt.inner.state.values() for t in s.values() if t.dim() > 0]
        seen: set = set()
        return {"params": bench._storages_nbytes(params, seen), "grads": bench._storages_nbytes(grads, seen),
                "optimizer": bench._storages_nbytes(states, seen)}

    def theory(self) -> dict:
        """Bytes per rank: the ideal 16 P / dp and the exact figures with FSDP2's padded shard storage."""
        import math

        from torch.distributed.fsdp import FSDPModule

        params = list(self.model.parameters())
        local = sum(p.numel() for p in params)  # DTensor: the local TP tensor's elements
        padded = sum(math.ceil(p.shape[0] / self.dp_size) * math.prod(p.shape[1:]) for p in params)
        held = sum(p.to_local().numel() for p in params)
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]

        def own(unit):  # the parameters a unit gathers: its own, not those of units inside it
            inner = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule) for p in m.parameters()}
            return sum(p.numel() for p in unit.parameters() if id(p) not in inner)

        return {"local_elements": local, "ideal": 16 * local // self.dp_size,
                "exact": {"params": 4 * padded, "grads": 4 * padded, "optimizer": 8 * held},
                "largest_unit": max(own(u) for u in units), "units": len(units)}


class _DeepSpeedZero3Run(bench._DeepSpeedAutoTPRun):
    """DeepSpeed ZeRO-3 with AutoTP (``tensor_parallel.autotp_size``) on gloo/CPU: bench.py's peer at stage 3."""

    def __init__(self, model_dir, dtype, lr, batch):
        super().__init__(model_dir, dtype, TP, lr, batch // DP, stage=3)
        self.dp_rank, self.dp_size = int(os.environ["RANK"]) // TP, DP

    def memory(self) -> dict:
        return {}  # only the peak RSS is compared: DeepSpeed's buffers are its own


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    cfg = bench.BenchConfig(**json.loads(args.config))
    torch.set_num_threads(cfg.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dist.init_process_group("gloo")
    import transformers  # noqa: F401  (loaded before the RSS baseline)

    import tp_trainer.zero  # noqa: F401
    from tp_trainer.memory_trace import LiveTensorBytes
    if args.runner == PEER:
        import deepspeed  # noqa: F401
    rss0 = bench._rss_bytes()
    if args.runner == "zero3":
        run = _Zero3Run(args.model_dir, dtype, cfg.lr, cfg.cpu_kernels)
    elif args.runner == "zero1":
        run = bench._OurRun(args.model_dir, dtype, TP, 1, cfg.lr, cpu_kernels=cfg.cpu_kernels)
    else:
        run = _DeepSpeedZero3Run(args.model_dir, dtype, cfg.lr, cfg.batch)
    bench._instrument(run)
    losses, times = [], []
    for step in range(cfg.warmup + cfg.steps):
        ids = bench._batch(cfg, step, run.dp_rank, run.dp_size)
        dist.barrier()
        t0 = time.perf_counter()
        losses.append(run.step(ids))
        times.append(time.perf_counter() - t0)
    # one untimed step: the live tensors at its start, after backward (the gradient peak), and the peak on top
    ids = bench._batch(cfg, cfg.warmup + cfg.steps, run.dp_rank, run.dp_size)
    at_start = sum(run.memory().values())
    with LiveTensorBytes() as live:
        run.forward_backward(ids)
        mem = run.memory()
        run.finish_step()
    record = {"losses": losses, "times": times[cfg.warmup:], "memory": mem, "peak_live": at_start + live.peak,
              "peak_rss_delta": run.peak_rss - rss0, "dp_rank": run.dp_rank, "dp_size": run.dp_size}
    if isinstance(run, _Zero3Run):
        record["theory"] = run.theory()
    bench.write_records(record, args.result)


# ================================================================================ parent side
def _estimates(cfg, model_dir: str, dtype: str, theory: dict, persistent: int) -> dict:
    """``estimate_memory(zero=3)`` where it covers stage 3, and the closed form of the module docstring."""
    from transformers import AutoConfig

    from tp_trainer.memory import DTYPE_BYTES, estimate_memory

    config = AutoConfig.from_pretrained(model_dir)
    kwargs = dict(tp=TP, dp=DP, dtype=dtype, batch=cfg.batch // DP, seq=cfg.seq, device="cpu",
                  cpu_kernels=cfg.cpu_kernels)
    out = {}
    try:
        out["estimator"] = estimate_memory(config, zero=3, **kwargs).peak  # persistent + step, as peak_live
    except ValueError as err:
        out["estimator_refused"] = str(err)
    activations = estimate_memory(config, zero=1, **kwargs).activations
    in_flight = (2 * DTYPE_BYTES[dtype] + 4) * theory["largest_unit"]
    out["closed_form"] = persistent + activations + in_flight
    out["closed_form_parts"] = {"persistent": persistent, "activations": activations, "unit_in_flight": in_flight}
    return out


def _step_medians(launch: list[dict]) -> float:
    return statistics.median(max(r["times"][i] for r in launch) for i in range(len(launch[0]["times"])))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def summarize(dtype: str, launches: dict, cfg, model_dir: str) -> dict:
    z3 = launches["zero3"][0]
    reference = bench._dp_mean_losses(launches["zero1"][0])
    row = {"dtype": dtype, "losses": {}, "median_step_s": {}, "ratios": {}}
    for runner, runs in launches.items():
        losses = bench._dp_mean_losses(runs[0])
        row["losses"][runner] = losses
        row["loss_max_abs_diff_vs_zero1"] = row.get("loss_max_abs_diff_vs_zero1", {})
        diff = max(abs(a - b) for run in runs for a, b in zip(bench._dp_mean_losses(run), reference))
        row["loss_max_abs_diff_vs_zero1"][runner] = diff
        row["median_step_s"][runner] = statistics.median(_step_medians(run) for run in runs)
        row["peak_rss_delta"] = row.get("peak_rss_delta", {})
        row["peak_rss_delta"][runner] = max(r["peak_rss_delta"] for run in runs for r in run)
    for other in ("zero1", PEER):
        if other in launches and row["loss_max_abs_diff_vs_zero1"][other] <= bench.LOSS_TOL[dtype]:
            paired = [_step_medians(a) / _step_medians(b) for a, b in zip(launches["zero3"], launches[other])]
            row["ratios"][f"zero3 / {other}"] = {"median": statistics.median(paired), "rounds": paired}
    row["bytes"] = []
    for r in z3:  # every rank
        measured = {k: r["memory"][k] for k in ("params", "grads", "optimizer")}
        total = sum(measured.values())
        row["bytes"].append({"measured": measured, "total": total, "ideal": r["theory"]["ideal"],
                             "exact": r["theory"]["exact"], "over_ideal": total / r["theory"]["ideal"] - 1})
    worst = max(z3, key=lambda r: r["peak_live"])
    persistent = worst["memory"]["params"] + worst["memory"]["optimizer"]
    row["peak_live"] = worst["peak_live"]
    row["estimates"] = _estimates(cfg, model_dir, dtype, worst["theory"], persistent)
    row["theory"] = worst["theory"]
    return row


def format_row(row: dict) -> str:
    lines = [f"== {row['dtype']}: tp={TP} x dp={DP}, ZeRO-3 ({row['theory']['units']} FSDP2 units, largest "
             f"{row['theory']['largest_unit']:,} local elements)"]
    for rank, b in enumerate(row["bytes"]):
        m = b["measured"]
        exact = "= exact theory" if m == b["exact"] else f"!= exact theory {b['exact']}"
        lines.append(f"rank {rank}: params {_mib(m['params'])}, grads {_mib(m['grads'])}, optimizer "
                     f"{_mib(m['optimizer'])}: {_mib(b['total'])} vs ideal 16 P/dp {_mib(b['ideal'])} "
                     f"({b['over_ideal']:+.2%}), {exact}")
    est = row["estimates"]
    line = f"peak of a step (largest rank): {_mib(row['peak_live'])}"
    if "estimator" in est:
        line += f"; estimate_memory(zero=3) {_mib(est['estimator'])} (measured / estimate {row['peak_live'] / est['estimator']:.3f})"
    else:
        line += f"; estimate_memory(zero=3) refused: {est['estimator_refused']}"
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in est["closed_form_parts"].items())
    line += (f"\n  closed form {_mib(est['closed_form'])} ({parts}): measured / closed form "
             f"{row['peak_live'] / est['closed_form']:.3f}")
    lines.append(line)
    for runner, t in row["median_step_s"].items():
        lines.append(f"{runner:<24} median step {t:.3f} s, peak RSS delta {_mib(row['peak_rss_delta'][runner])}, "
                     f"loss vs zero1 max |diff| {row['loss_max_abs_diff_vs_zero1'][runner]:.2e}")
    for name, r in row["ratios"].items():
        lines.append(f"{name}: {r['median']:.3f} (rounds {', '.join(f'{x:.3f}' for x in r['rounds'])})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = bench.BenchConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--peers", choices=["auto", "none"], default="auto",
                        help="auto: DeepSpeed ZeRO-3 + AutoTP when deepspeed is importable")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench_zero3.json")
    bench.add_worker_arguments(parser)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cfg = bench.BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if cfg.batch % DP:
        raise SystemExit(f"--batch {cfg.batch} must be divisible by dp={DP}")
    import importlib.util

    runners = list(RUNNERS) + ([PEER] if args.peers == "auto" and importlib.util.find_spec("deepspeed") else [])
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "model")
        bench._write_model(cfg, model_dir)
        for dtype in args.dtypes:
            launches: dict = {}
            for rnd in range(args.rounds):
                for runner in runners:
                    if runner in launches and launches[runner] is None:
                        continue
                    print(f"[bench_zero3] round {rnd + 1}/{args.rounds}: {runner} {dtype}", file=sys.stderr, flush=True)
                    result = os.path.join(workdir, f"{runner}_{dtype}_{rnd}.json")
                    try:
                        launches.setdefault(runner, []).append(bench.launch_workers(
                            os.path.abspath(__file__), TP * DP, cfg.threads, result,
                            ["--runner", runner, "--dtype", dtype, "--model-dir", model_dir,
                             "--config", json.dumps(asdict(cfg))], what=f"{runner} {dtype}"))
                    except RuntimeError as err:
                        if runner != PEER:
                            raise
                        print(f"[bench_zero3] {runner} could not run: {err}", file=sys.stderr)
                        failures.append({"runner": runner, "dtype": dtype, "error": str(err)})
                        launches[runner] = None
            launches = {k: v for k, v in launches.items() if v is not None}
            row = summarize(dtype, launches, cfg, model_dir)
            rows.append(row)
            print(format_row(row), flush=True)
    for f in failures:
        print(f"{f['runner']} ({f['dtype']}) did not run: {f['error'].splitlines()[-1]}")
    with open(args.out, "w") as f:
        json.dump({"config": asdict(cfg), "rows": rows, "peer_failures": failures,
                   "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}, f, indent=1)
    bad = [f"{r['dtype']} {k}" for r in rows for k, d in r["loss_max_abs_diff_vs_zero1"].items()
           if k == "zero3" and d > bench.LOSS_TOL[r["dtype"]]]
    if bad:
        print(f"ZeRO-3 loss differs from ZeRO-1's at the same layout: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
