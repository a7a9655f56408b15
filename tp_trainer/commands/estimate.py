"""``tp-trainer estimate --model CONFIG_OR_DIR --tp N --dp M --zero S --dtype bf16 --batch B --seq L``.

Prints the per-rank memory of training that model in that layout (parameters, gradients,
optimizer states, activations saved for backward, and the peak of a training step, which is
what must fit): "which layout fits my model". Nothing is downloaded or allocated: the model is
built on the ``meta`` device from its config, sharded by the real planner, and one training
step is simulated on it (:mod:`tp_trainer.memory`). ``--device`` picks the kernels whose saved
tensors count, those a run there uses (``tp_trainer/parallel/kernels.py``; ``cuda``: flash /
memory-efficient SDPA; ``cpu``: tp_trainer's CPU attention, or with ``--cpu-kernels off`` SDPA; the lean
norms, gated MLPs and LM head + loss on both, ``parallel/kernels.py``). ``--compare`` adds one line per ZeRO stage (0-3) for the same tp x dp; ``--zero 3`` is FSDP2 per block (``zero/fully_sharded.py``).
``--activation-checkpointing``: the Trainer's ``--activation_checkpointing`` (each decoder layer
keeps only its input for backward and recomputes its forward there). ``--sequence-parallel``: the
Trainer's ``--sequence_parallel`` (activations between the TP regions split along the sequence).

``--fit 80GiB`` answers the other question: the longest sequence (at ``--batch``, in steps of
``--fit-step`` tokens) and the largest micro-batch (at ``--seq``) whose peak fits that much per GPU
in this layout (a handful of simulated steps of one sharded meta model, :func:`tp_trainer.memory.fit_memory`).
"""

from __future__ import annotations

import argparse
import sys

HELP = "print the per-rank memory (params, grads, optimizer, activations, peak) of a tp x dp x zero layout"
UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6, "g": 2**30,
         "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"80GiB"`` -> bytes (GiB/MiB/TiB: powers of 2, GB/MB/TB: of 10, a bare G: GiB); a clear error otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--fit takes a positive memory size such as 80GiB, 79.6GB or 40960MiB, got {text!r}")
    return int(float(m.group(1)) * UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-trainer estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory, config.json, or model type")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (world = tp x dp)")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage over the dp group (3: FSDP2 per block)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="training dtype of the weights")
    parser.add_argument("--batch", type=int, default=1, help="per-device (per dp rank) micro-batch size")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where it trains: decides the attention kernel (default: cuda)")
    parser.add_argument("--cpu-kernels", default="auto", choices=["auto", "off"],
                        help="the run's --cpu_kernels: with --device cpu, 'off' counts the stock attention and norms")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="with the Trainer's --activation_checkpointing (decoder layers recomputed in backward)")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="with the Trainer's --sequence_parallel (activations split along the sequence over tp)")
    parser.add_argument("--fit", metavar="SIZE", help="per-GPU memory, e.g. 80GiB: print the longest sequence "
                        "(at --batch) and the largest micro-batch (at --seq) that fit it in this layout")
    parser.add_argument("--fit-step", type=int, default=256, help="granularity of --fit's sequence length (tokens)")
    parser.add_argument("--compare", action="store_true", help="also print the peaks of ZeRO 0/1/2/3")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("tp", "dp", "batch", "seq", "fit_step"):
        if getattr(args, name) < 1:
            print(f"tp-trainer estimate: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    try:
        budget = parse_bytes(args.fit) if args.fit is not None else None
    except ValueError as err:
        print(f"tp-trainer estimate: {err}", file=sys.stderr)
        return 2

    from ..memory import estimate_memory, fit_memory
    from ..planner import PlanError
    from .plan import load_config

    try:
        config = load_config(args.model)
        layout = dict(tp=args.tp, dp=args.dp, dtype=args.dtype, batch=args.batch, seq=args.seq, device=args.device,
                      checkpointing=args.activation_checkpointing, cpu_kernels=args.cpu_kernels,
                      sequence_parallel=args.sequence_parallel)
        if budget is not None:
            return _print_fit(fit_memory(config, budget, zero=args.zero, seq_step=args.fit_step, **layout), config,
                              as_json=args.json)
        est = estimate_memory(config, zero=args.zero, **layout)
        others = [estimate_memory(config, zero=z, **layout) for z in (0, 1, 2, 3) if args.compare and z != args.zero]
    except (ValueError, PlanError, OSError) as err:
        print(f"tp-trainer estimate: cannot estimate {args.model} at tp={args.tp}: {err}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(est.as_dict(), indent=1))
        return 0
    print(est.table())
    for other in others:
        print(f"  (zero={other.zero}: peak {other.peak / 2**30:.2f} GiB, optimizer {other.optimizer / 2**30:.2f} GiB, "
              f"gradients {other.grads / 2**30:.2f} GiB)")
    return 0


def _print_fit(fit, config, *, as_json: bool) -> int:
    gib = 2**30
    if as_json:
        import json
        from dataclasses import asdict

        print(json.dumps(asdict(fit), indent=1))
        return 0
    print(fit.layout)
    print(f"  budget per GPU                     {fit.budget / gib:9.2f} GiB")
    print(f"  persistent (params, optimizer)     {fit.persistent / gib:9.2f} GiB"
          + ("  (more than the budget: nothing fits)" if fit.persistent >= fit.budget else ""))
    if fit.longest_seq:
        limit = getattr(config, "max_position_embeddings", None)
        beyond = f" (beyond the config's max_position_embeddings {limit})" if limit and fit.longest_seq > limit else ""
        print(f"  longest sequence at micro-batch {fit.batch:<3}  {fit.longest_seq} tokens, peak "
              f"{fit.at_longest_seq.peak / gib:.2f} GiB{beyond}")
    else:
        print(f"  longest sequence at micro-batch {fit.batch:<3}  none: {fit.seq_step} tokens do not fit")
    if fit.largest_batch:
        print(f"  largest micro-batch at {fit.seq} tokens  {fit.largest_batch}, peak "
              f"{fit.at_largest_batch.peak / gib:.2f} GiB")
    else:
        print(f"  largest micro-batch at {fit.seq} tokens  none: one sequence does not fit")
    return 0
