"""The README's "What fits" table: ``tp-trainer estimate --fit`` for Llama-3-8B and Llama-3-70B layouts.

Usage::

    python scripts/fit_table.py [--budget 80GiB] [--seq 8192]    # prints the Markdown table (~15 min on 2 cores)

Each cell runs ``tp-trainer estimate --model scripts/configs/<model>.json --tp T --dp D --zero S
--dtype bf16 --seq 8192 --fit 80GiB`` (CUDA kernels: flash attention; the lean activations, the default)
with and without ``--sequence-parallel`` and ``--activation-checkpointing``, and reads the longest
sequence at micro-batch 1 and the largest micro-batch at ``--seq`` tokens from its output. A layout
whose states alone exceed the budget gets ``-``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [  # (model, GPUs, [(tp, dp, zero), ...]) -- several layouts in one row share it when none fits
    ("llama-3-8b", 8, [(4, 2, 1)]),
    ("llama-3-8b", 8, [(8, 1, 0)]),
    ("llama-3-8b", 16, [(4, 4, 1)]),
    ("llama-3-8b", 16, [(8, 2, 1)]),
    ("llama-3-70b", 8, [(4, 2, 1), (8, 1, 0)]),
    ("llama-3-70b", 16, [(4, 4, 1), (8, 2, 1)]),
    ("llama-3-70b", 16, [(8, 2, 3)]),
    ("llama-3-70b", 32, [(8, 4, 2)]),
]
COLUMNS = [("plain", []), ("+ SP", ["--sequence-parallel"]), ("+ checkpointing", ["--activation-checkpointing"]),
           ("+ both", ["--sequence-parallel", "--activation-checkpointing"])]


def estimate(model: str, tp: int, dp: int, zero: int, flags: list[str], budget: str, seq: int) -> dict:
    cmd = [sys.executable, "-m", "tp_trainer.cli", "estimate", "--model", os.path.join(HERE, "configs", f"{model}.json"),
           "--tp", str(tp), "--dp", str(dp), "--zero", str(zero), "--dtype", "bf16", "--seq", str(seq),
           "--fit", budget, *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    states = re.search(r"persistent \(params, optimizer\)\s+([\d.]+) GiB", out)
    longest = re.search(r"longest sequence at micro-batch 1\s+(\d+) tokens", out)
    batch = re.search(rf"largest micro-batch at {seq} tokens\s+(\d+)", out)
    return {"states": float(states.group(1)) if states else None,
            "longest": int(longest.group(1)) if longest else None, "batch": int(batch.group(1)) if batch else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="80GiB")
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    print("| model, GPUs | layout | states | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|:---|:---|---:|" + "---:|" * len(COLUMNS))
    for model, gpus, layouts in ROWS:
        results = [[estimate(model, tp, dp, zero, flags, args.budget, args.seq) for _, flags in COLUMNS]
                   for tp, dp, zero in layouts]
        layout = " / ".join(f"tp={tp}" + (f" x dp={dp}" if dp > 1 else "") for tp, dp, _ in layouts)
        zeros = " / ".join(str(z) for _, _, z in layouts)
        states = " / ".join(f"{r[0]['states']:.3g}" for r in results) + " GiB"
        if len(layouts) > 1:
            cells = ["-"] * len(COLUMNS)  # rows of several layouts are the ones where nothing fits
            assert all(c["longest"] is None for r in results for c in r), (model, layouts)
        else:
            cells = [f"{c['longest']:,} / {c['batch'] or 0}" if c["longest"] else "-" for c in results[0]]
        name = {"llama-3-8b": "Llama-3-8B", "llama-3-70b": "Llama-3-70B"}[model]
        print(f"| {name}, {gpus} | {layout}, ZeRO-{zeros} | {states} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
