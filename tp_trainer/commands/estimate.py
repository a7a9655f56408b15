"""``tp-trainer estimate --model CONFIG_OR_DIR --tp N --dp M --zero S --dtype bf16 --batch B --seq L``.

Prints the per-rank memory of training that model in that layout (parameters, gradients,
optimizer states, activations saved for backward, and the peak of a training step, which is
what must fit): "which layout fits my model". Nothing is downloaded or allocated: the model is
built on the ``meta`` device from its config, sharded by the real planner, and one training
step is simulated on it (:mod:`tp_trainer.memory`). ``--device`` picks the kernels whose saved
tensors count, those a run there uses (``tp_trainer/parallel/kernels.py``; ``cuda``: flash /
memory-efficient SDPA and the stock norms; ``cpu``: tp_trainer's CPU attention and fused norms,
or with ``--cpu-kernels off`` the stock ones). ``--compare`` adds one line per ZeRO stage for the same tp x dp.
``--activation-checkpointing``: the Trainer's ``--activation_checkpointing`` (each decoder layer
keeps only its input for backward and recomputes its forward there).
"""

from __future__ import annotations

import argparse
import sys

HELP = "print the per-rank memory (params, grads, optimizer, activations, peak) of a tp x dp x zero layout"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-trainer estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory, config.json, or model type")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (world = tp x dp)")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2], help="ZeRO stage over the dp group")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="training dtype of the weights")
    parser.add_argument("--batch", type=int, default=1, help="per-device (per dp rank) micro-batch size")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where it trains: decides the attention kernel (default: cuda)")
    parser.add_argument("--cpu-kernels", default="auto", choices=["auto", "off"],
                        help="the run's --cpu_kernels: with --device cpu, 'off' counts the stock attention and norms")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="with the Trainer's --activation_checkpointing (decoder layers recomputed in backward)")
    parser.add_argument("--compare", action="store_true", help="also print the peaks of ZeRO 0/1/2")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("tp", "dp", "batch", "seq"):
        if getattr(args, name) < 1:
            print(f"tp-trainer estimate: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2

    from ..memory import estimate_memory
    from ..planner import PlanError
    from .plan import load_config

    try:
        config = load_config(args.model)
        layout = dict(tp=args.tp, dp=args.dp, dtype=args.dtype, batch=args.batch, seq=args.seq, device=args.device,
                      checkpointing=args.activation_checkpointing, cpu_kernels=args.cpu_kernels)
        est = estimate_memory(config, zero=args.zero, **layout)
        others = [estimate_memory(config, zero=z, **layout) for z in (0, 1, 2) if args.compare and z != args.zero]
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
