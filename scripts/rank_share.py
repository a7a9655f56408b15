"""How close to ``single / 2`` can a tp=2 rank get at all? Its share of the work, without communication.

Usage::

    python scripts/rank_share.py --dtype bf16 --steps 20      # the benchmark's model and batch
    python scripts/rank_share.py --dtype bf16 --pair          # two processes' cost to each other

A tp=2 rank of the benchmark's Llama holds half the attention heads, half the MLP and half the
vocabulary, and the whole of everything TP does not split: the embedding lookup's output, the
norms and residual adds on every token, and one Python/dispatcher call per op, as many ops as
the full model. This script builds that share as a model of its own (heads, KV heads,
intermediate size and vocabulary halved, hidden size kept) next to the full model, in one
process on one core, and alternates their training steps (forward, backward, clipping, fused
AdamW), so a slow spell of the machine hits both alike. It prints

    share / (full / 2)    median over steps of each pair, and on the fastest step of each

which is the ``tp2 / (single / 2)`` a tensor-parallel implementation would reach with free,
instant communication. Both models use the CPU attention kernel and the fused RMSNorms, as the
benchmark's single process does (the real tp=2 rank also token-splits its 16-bit norms).

Eager runs add a third model to the rotation: tp_trainer's own tp=2 rank 0 (the benchmark's
weights, planned and sharded as ``scripts/bench.py`` does, stepped by ``ShardedOptimizer``) on
a simulated TP group (``parallel/simulated.py``: each all-reduce copies its input, each
all-gather repeats it, nothing waits for a peer), printed as

    our rank / share       the cost of our TP code itself, beyond the work the rank must do

so that ``tp2 / (single / 2)`` from ``scripts/bench.py`` splits into the share, our code, and
what only two real processes add (waiting for each other, the transport, sharing the machine).
Its losses are not a real rank's (the sums are not sums); only its time is used.

``--compile`` runs the three models' forward (and its backward) through ``torch.compile``
(Inductor's C++ backend, through the same CPU attention kernel and fused norms; our rank's
collectives are custom operators inside its graph): how much of the share's excess is per-op
overhead and unfused elementwise passes that a compiled step removes.
``--pair`` measures what the two processes of a real tp=2 job cost each other on the machine
without communicating (shared caches, memory bandwidth, the hypervisor): that third model run
alone, then in two processes at once.
No communication; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the model and batch of the benchmark)


def _stepper(cfg: bench.BenchConfig, dtype, model_dir: str, *, share: bool, compiled: bool):
    """The benchmark's single process (``bench._OurRun`` at tp=1: its kernels and optimizer) on the
    full model, or on a tp=2 rank's share of it as a model of its own; written to ``model_dir``."""
    from tp_trainer.parallel.context import ParallelContext

    bench._write_model(cfg, model_dir, tp_share=2 if share else 1)
    return _timed(bench._OurRun(model_dir, dtype, 1, 0, cfg.lr, ctx=ParallelContext.single(), compiled=compiled), cfg)


def _our_rank_stepper(cfg: bench.BenchConfig, dtype, model_dir: str, *, compiled: bool = False):
    """Rank 0 of tp_trainer's tp=2 benchmark layout (``bench._OurRun``, the benchmark's own code
    path), on a simulated TP group (see the module docstring)."""
    from tp_trainer.parallel.simulated import simulated_group
    from tp_trainer.parallel.context import ParallelContext

    ctx = ParallelContext(tp_size=2, tp_rank=0, tp_group=simulated_group(2))
    return _timed(bench._OurRun(model_dir, dtype, 2, 0, cfg.lr, ctx=ctx, compiled=compiled), cfg)


def _timed(run, cfg: bench.BenchConfig):
    """``step(i)``: one timed training step of ``run`` on the benchmark's batch ``i`` (ids folded into
    the model's vocabulary, which a share model halves); ``step.model`` is its model."""
    bench._instrument(run)
    vocab = run.model.config.vocab_size

    def step(i: int) -> float:
        ids = bench._batch(cfg, i, 0, 1).remainder(vocab)
        start = time.perf_counter()
        run.forward_backward(ids)
        run.finish_step()
        return time.perf_counter() - start

    step.model = run.model
    return step


def _training_process(dtype: str):
    """Set this process up as the benchmark's ranks are (one thread, freed memory kept in the heap);
    returns the torch dtype named ``dtype``."""
    import torch

    from tp_trainer.parallel.host import keep_freed_memory_in_heap

    torch.set_num_threads(1)
    keep_freed_memory_in_heap()
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each model (after 2 warm-up)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (about a minute to compile)")
    parser.add_argument("--pair", action="store_true",
                        help="instead: our rank without its peer in one process alone, then in two processes at once")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # --pair's worker processes
    args = parser.parse_args(argv)
    if args.pair:
        return _pair(args)
    cfg, dtype = bench.BenchConfig(), _training_process(args.dtype)
    with tempfile.TemporaryDirectory() as workdir:
        full_dir = os.path.join(workdir, "full")  # the benchmark's model, which our rank 0 shards too
        steppers = {"full": _stepper(cfg, dtype, full_dir, share=False, compiled=args.compile),
                    "share": _stepper(cfg, dtype, os.path.join(workdir, "share"), share=True, compiled=args.compile)}
        steppers["ours"] = _our_rank_stepper(cfg, dtype, full_dir, compiled=args.compile)
        times = {name: [] for name in steppers}
        for i in range(args.steps + 2):
            for name, step in steppers.items():
                times[name].append(step(i))
    tf, ts = times["full"][2:], times["share"][2:]
    pairs = [s / (f / 2) for f, s in zip(tf, ts)]
    label = f"{args.dtype}{' compiled' if args.compile else ''}"
    print(f"{label}: full model {statistics.median(tf) * 1e3:.0f} ms (fastest {min(tf) * 1e3:.0f}), "
          f"a tp=2 rank's share {statistics.median(ts) * 1e3:.0f} ms (fastest {min(ts) * 1e3:.0f})")
    print(f"share / (full / 2): {statistics.median(pairs):.3f} (median of {len(pairs)} alternating pairs), "
          f"{min(ts) / min(tf) * 2:.3f} (fastest steps)")
    to = times["ours"][2:]
    print(f"our tp=2 rank 0 without its peer {statistics.median(to) * 1e3:.0f} ms (fastest {min(to) * 1e3:.0f}); "
          f"our rank / share: {statistics.median([o / s for o, s in zip(to, ts)]):.3f} (median of pairs), "
          f"{min(to) / min(ts):.3f} (fastest steps)")
    return 0


def _pair(args) -> int:
    """What two processes on the machine cost each other, without communicating: our simulated rank 0
    (above) stepped in one process alone, then in two processes at once, each on its own thread
    budget of one (``OMP_NUM_THREADS=1``); a real tp=2 job runs two such ranks side by side."""
    import json
    import subprocess

    if args.model_dir:  # worker: step, print the median
        step = _our_rank_stepper(bench.BenchConfig(), _training_process(args.dtype), args.model_dir)
        times = [step(i) for i in range(args.steps + 4)][4:]  # 4 warm-up steps, as the benchmark
        print(json.dumps(statistics.median(times)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as model_dir:
        bench._write_model(bench.BenchConfig(), model_dir)
        cmd = [sys.executable, os.path.abspath(__file__), "--pair", "--dtype", args.dtype, "--steps", str(args.steps),
               "--model-dir", model_dir]

        def run(count: int) -> list[float]:
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True) for _ in range(count)]
            outs = [p.communicate()[0] for p in procs]
            if any(p.returncode for p in procs):
                raise SystemExit("a --pair worker failed")
            return [json.loads(out.strip().splitlines()[-1]) for out in outs]

        alone, pair, alone_again = run(1), run(2), run(1)
    base = statistics.mean(alone + alone_again)
    print(f"{args.dtype}: our tp=2 rank 0 without its peer, alone {alone[0] * 1e3:.0f} and "
          f"{alone_again[0] * 1e3:.0f} ms, two processes at once {pair[0] * 1e3:.0f} and {pair[1] * 1e3:.0f} ms")
    print(f"two at once / alone: {max(pair) / base:.3f} (the slower process; a tp=2 step waits for it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
