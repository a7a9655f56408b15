"""``tp-trainer report``: the seed's experiments in miniature on the built-in default.

Runs ``tp-trainer train RECIPE`` once per layout of :func:`tp_trainer.app.report.seed_layouts`
(dp-only ZeRO-1 and ZeRO-2, torch FSDP full-shard as the ZeRO-3-like baseline, TP only,
TP x ZeRO-1, TP x ZeRO-2; all at the same global batch, from the same initial weights and
data), then resumes the two TP x ZeRO runs from their mid-run checkpoint. It writes to ``--out``:

* ``loss_curves.png``: every layout's loss curve on one plot, with the gaps to the reference;
* ``resume_zero1.png``, ``resume_zero2.png``: original vs resumed curves;
* ``report.md``: the agreement verdicts, a table of final loss / eval loss / accuracy per
  layout and the seed's table 1 (rows: tasks; columns: the model before SFT and each layout);
* ``results.json``: every number above.

Each run is an ordinary self-launched ``tp-trainer train`` (logs in ``WORK/<run>.log``); a run
whose saved model and loss log already exist is reused with ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HELP = "the seed's layout matrix in miniature: loss-curve overlay, resume curves, eval table"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_training(recipe: str, out_dir: str, overrides: list[str], *, reuse: bool) -> list[dict]:
    """One ``tp-trainer train`` run (self-launched); returns its ``log_history``."""
    history = os.path.join(out_dir, "log_history.json")
    if not (reuse and os.path.isfile(history) and os.path.isfile(os.path.join(out_dir, "final", "config.json"))):
        os.makedirs(out_dir, exist_ok=True)
        log = out_dir.rstrip("/") + ".log"
        cmd = [sys.executable, "-m", "tp_trainer.cli", "train", recipe, "--output_dir", out_dir, *overrides]
        print(f"[report] {' '.join(cmd[2:])}  (log: {log})", flush=True)
        with open(log, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if code != 0:
            with open(log) as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(f"training run {out_dir} failed with exit code {code}; last lines of {log}:\n{tail}")
    with open(history) as f:
        return json.load(f)


def parse_args(argv):
    from ..app.report import DEFAULT_TOLERANCE

    p = argparse.ArgumentParser(prog="tp-trainer report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny-sft.yaml")
    p.add_argument("--out", default="docs/seed-miniature", help="figures, report.md, results.json")
    p.add_argument("--work", default="runs/seed-miniature", help="training runs and their logs")
    p.add_argument("--world-size", type=int, default=4, help="ranks per layout (4: tp 2 x dp 2 for TP+ZeRO)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--layouts", default=None, help="comma-separated layout indices (0-5) to run; default all")
    p.add_argument("--no-resume", action="store_true", help="skip the resumed runs")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max |loss diff| for agreement")
    p.add_argument("--eval-limit", type=int, default=None, help="eval records per model (default: all)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work")
    p.add_argument("--extra", default="", help="extra train overrides for every run, e.g. '--seed 1'")
    return p.parse_args(argv)


def require_matplotlib() -> None:
    """The figures need matplotlib (the ``report`` extra): refuse before any training run, not after 20 minutes."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise SystemExit("tp-trainer report draws its figures with matplotlib, which is not installed "
                         f"({err}); install it with: pip install 'tp_trainer[report]' (or pip install matplotlib)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    require_matplotlib()
    from ..app import report as R
    from ..app.evaluate import format_accuracy_table
    from ..app.recipe import parse_recipe
    from .eval import evaluate_model_dir, load_records
    from .train import resolve_assets

    layouts = R.seed_layouts(args.world_size)
    if args.layouts:
        layouts = [layouts[int(i)] for i in args.layouts.split(",")]
    mid = args.max_steps // 2
    data_dir = os.path.join(args.work, "builtin")
    common = ["--data_dir", data_dir, "--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps),
              "--eval_after_train", "false", *args.extra.split()]
    # only the data/model fields matter here: parse as a 1-process world (the runs choose their own layouts)
    recipe = parse_recipe([args.recipe, "--output_dir", args.work, *common[:2], *args.extra.split(),
                           "--tp_size", "1", "--zero_stage", "0", "--nproc_per_node", "1"])
    paths = resolve_assets(recipe)  # generate data, tokenizer and initial weights once for all runs
    os.makedirs(args.out, exist_ok=True)

    curves, runs = {}, {}
    for layout in layouts:
        resumable = layout.tp_size > 1 and layout.zero_stage > 0 and not args.no_resume
        save = ["--save_strategy", "steps", "--save_steps", str(mid)] if resumable else ["--save_strategy", "no"]
        out = os.path.join(args.work, slug(layout.name))
        curves[layout.name] = R.loss_curve(run_training(args.recipe, out, layout.overrides(args.global_batch) +
                                                        common + save, reuse=args.reuse))
        runs[layout.name] = (layout, out)
    resumed = {}
    for name, (layout, out) in list(runs.items()):
        if layout.tp_size > 1 and layout.zero_stage > 0 and not args.no_resume:
            res_out = out + "-resumed"
            ckpt = os.path.join(out, f"checkpoint-{mid}")
            history = run_training(args.recipe, res_out, layout.overrides(args.global_batch) + common +
                                   ["--save_strategy", "no", "--resume_from_checkpoint", ckpt], reuse=args.reuse)
            resumed[name] = (R.loss_curve(history), res_out, layout)

    # ---- agreement
    ref_name = next(iter(curves))
    agreements = {n: R.compare_curves(n, curves[ref_name], c, tolerance=args.tolerance)
                  for n, c in curves.items() if n != ref_name}
    resume_agreements = {n: R.compare_curves(f"{n} resumed@{mid}", curves[n], c, tolerance=args.tolerance,
                                             after_step=mid) for n, (c, _, _) in resumed.items()}

    # ---- evaluation (one process, the saved HF models)
    records = load_records(paths["eval"], args.eval_limit)
    max_len = recipe.data.max_length
    print(f"[report] evaluating {len(runs) + 1} models on {len(records)} eval records", flush=True)
    evals = {"model before SFT": evaluate_model_dir(paths["model"], records, max_length=max_len,
                                                    max_new_tokens=recipe.data.eval_max_new_tokens)}
    for name, (_, out) in runs.items():
        evals[name] = evaluate_model_dir(os.path.join(out, "final"), records, max_length=max_len,
                                         max_new_tokens=recipe.data.eval_max_new_tokens)
    rows = []
    for name, (layout, _) in runs.items():
        curve = curves[name]
        agreement = agreements.get(name)
        rows.append(dict(name=name, world=layout.nproc, tp=layout.tp_size, dp=layout.dp_size,
                         zero="FSDP full-shard" if layout.fsdp else str(layout.zero_stage), gbs=args.global_batch,
                         final_loss=curve[max(curve)], eval_loss=evals[name]["eval_loss"],
                         accuracy=evals[name]["overall"], gap=None if agreement is None else agreement.max_abs_diff,
                         agrees=None if agreement is None else agreement.agrees))

    # ---- figures and report
    title = f"tiny-llama SFT, global batch {args.global_batch}, {args.max_steps} steps"
    figures = [R.plot_overlay(curves, os.path.join(args.out, "loss_curves.png"), title=title)]
    for name, (curve, _, layout) in resumed.items():
        fig = os.path.join(args.out, f"resume_zero{layout.zero_stage}.png")
        figures.append(R.plot_resume(curves[name], curve, mid, fig, title=f"{name}: resumed from step {mid}"))
    verdicts = [a.describe() for a in agreements.values()] + [a.describe() for a in resume_agreements.values()]
    all_agree = all(a.agrees for a in [*agreements.values(), *resume_agreements.values()])
    md = "\n".join([
        f"# Seed experiments in miniature ({title})", "",
        f"Reference curve: {ref_name}. Tolerance: max |loss difference| <= {args.tolerance:g} nats on the logged "
        f"loss (mean of {args.logging_steps} steps); see tp_trainer/app/report.py for why.", "",
        *[f"- {v}" for v in verdicts], "",
        f"**All curves agree within tolerance: {'yes' if all_agree else 'NO'}.**", "",
        R.summary_table(rows), "",
        "Exact-match accuracy per task on the held-out split (the seed's table 1 shape):", "",
        format_accuracy_table(evals), "",
        *[f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures], ""])
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"curves": curves, "resumed": {n: c for n, (c, _, _) in resumed.items()}, "eval": evals,
                   "rows": rows, "verdicts": verdicts, "all_agree": all_agree, "tolerance": args.tolerance}, f,
                  indent=1)
    print(md, flush=True)
    return 0 if all_agree else 1
