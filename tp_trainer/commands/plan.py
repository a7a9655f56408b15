"""``tp-trainer plan MODEL_DIR_OR_CONFIG --tp-size N``: print the sharding plan, per module, with reasons.

The model is built on the ``meta`` device from its config (no weights are read or allocated),
so planning a 70B model takes a second. The argument is a model directory, a ``config.json``
or a model type known to transformers (``llama``, ``gpt2``, ...) for its default config.

``--verify`` then checks the plan numerically on the CPU (:mod:`tp_trainer.planner.verify`): one
training step of a 2-layer, random-weight copy of the model, sharded over ``tp_size`` gloo
processes, against the unsharded copy; it prints the largest differences per module and
``verify: PASS`` (exit code 0) or ``verify: FAIL``/``ERROR`` (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "print how every module of a model is split for a tp size, and why"


def load_config(spec: str):
    """A ``PretrainedConfig`` from a directory, a config.json path or a model type name (offline)."""
    from transformers import AutoConfig

    if os.path.isdir(spec):
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    if os.path.isfile(spec):
        with open(spec) as f:
            data = json.load(f)
        if "model_type" not in data:
            raise ValueError(f"{spec}: config.json has no 'model_type'")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.for_model(spec)
    except ValueError:
        raise ValueError(f"{spec!r} is neither a model directory, a config.json nor a known model type") from None


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tp-trainer plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory, config.json, or model type")
    parser.add_argument("--tp-size", type=int, required=True)
    parser.add_argument("--tp-plan", default=None, help="JSON object mapping module patterns to styles (overrides), "
                        "e.g. '{\"model.layers.*.mlp.down_proj\": \"rowwise\"}'")
    parser.add_argument("--full", action="store_true", help="one row per module instead of one per layer pattern")
    parser.add_argument("--verify", action="store_true",
                        help="then run one training step of the plan on the CPU (tp_size gloo processes, the model "
                             "truncated to 2 layers and a ~1024 vocabulary, random fp32 weights) against the unsharded "
                             "model: loss, logits and every gradient compared; exit code 1 unless it passes")
    args = parser.parse_args(argv)

    from ..planner import PlanError, plan_tensor_parallel
    from ..planner.validate import parse_tp_plan

    try:  # a malformed --tp-plan is a usage error: named before any model is built
        user_plan = parse_tp_plan(args.tp_plan, option="--tp-plan")
    except ValueError as err:
        print(f"tp-trainer plan: {err}", file=sys.stderr)
        return 2
    ranks = None
    if args.verify and args.tp_size >= 1:  # the check's processes start up (imports) while this one plans
        from ..planner.verify import start_ranks

        ranks = start_ranks(args.tp_size)
    try:
        try:
            config = load_config(args.model)
            model = meta_model(config)
            plan = plan_tensor_parallel(model, args.tp_size, user_plan=user_plan)
        except (ValueError, PlanError, OSError) as err:
            print(f"tp-trainer plan: cannot plan {args.model} at tp_size={args.tp_size}: {err}", file=sys.stderr)
            return 1
        print(plan.table(collapse_layers=not args.full))
        print(f"\nsummary: {plan.summary()}")
        print(_kernels_line())
        if args.verify:
            from ..planner.verify import verify_plan

            sys.stdout.flush()
            result = verify_plan(config, args.tp_size, user_plan=user_plan, full_plan=plan, ranks=ranks)
            print("\n" + result.report())
            return 0 if result.passed else 1
        return 0
    finally:
        if ranks is not None:
            ranks.close()


def _kernels_line() -> str:
    """The kernels a training run on this machine would pick by default (``--cpu_kernels auto``)."""
    from ..parallel.context import default_device_and_backend
    from ..parallel.kernels import choose_kernels

    device, backend = default_device_and_backend()
    return f"on this machine ({device.type}, {backend}): " + choose_kernels(device, backend).describe()
