"""The main job end to end: ``tp-trainer report`` self-launches two real 2-process runs of the default.

One report call (the costly part, ~1 minute on 2 cores) is shared by the checks below:
``tp-trainer train recipes/tiny-sft.yaml`` run from a plain process relaunches itself through
``torch.distributed.run``; a tp=2 run and a dp=2 ZeRO-1 run from the same initial weights must
produce the same loss curve; the saved models load with ``from_pretrained`` and generate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distributed import skip_unless_world_fits
from tp_trainer.app.report import compare_curves, loss_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "recipes", "tiny-sft.yaml")
STEPS = 6
DP_RUN, TP_RUN = "zero-1-dp2", "tp2-x-zero-1-dp1"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    skip_unless_world_fits(2)
    tmp = tmp_path_factory.mktemp("report")
    out, work = tmp / "out", tmp / "work"
    cmd = [sys.executable, "-m", "tp_trainer.cli", "report", "--recipe", DEFAULT, "--out", str(out),
           "--work", str(work), "--world-size", "2", "--layouts", "0,4", "--no-resume", "--max-steps", str(STEPS),
           "--logging-steps", "1", "--eval-limit", "7",
           "--extra", "--generated_train_size 140 --generated_eval_size 14 --max_length 128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a plain shell: the command must launch its own world
        env.pop(key, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"report failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out / "results.json") as f:
        return {"out": out, "work": work, "results": json.load(f), "stdout": proc.stdout}


def test_self_launched_tp_run_shows_summary_progress_and_learns(report):
    log = (report["work"] / f"{TP_RUN}.log").read_text()
    assert "world=2 = dp 1 x tp 2" in log            # startup summary (mesh, plan, global batch, params)
    assert "global batch = 16 per device x dp 1 x grad accum 1 = 16" in log
    assert f"{STEPS}/{STEPS} [" in log                    # the Trainer's progress bar
    curve = loss_curve(json.loads((report["work"] / TP_RUN / "log_history.json").read_text()))
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.1                  # warm-up steps already move the loss down


def test_tp_and_dp_layouts_have_the_same_loss_curve(report):
    res = report["results"]
    curves = {name: {int(s): v for s, v in c.items()} for name, c in res["curves"].items()}
    (dp_name, dp), (tp_name, tp) = curves.items()
    agreement = compare_curves(tp_name, dp, tp)
    # Same initial weights, data order and global batch (8): the two layouts compute the same update and
    # differ only in summation order (~1e-7 relative in fp32), which 6 steps amplify to well under 1e-4.
    assert agreement.steps_compared == STEPS and agreement.max_abs_diff < 1e-4, agreement.describe()
    assert res["all_agree"] and "All curves agree within tolerance: yes" in report["stdout"]
    # The check is not vacuous: a curve shifted by twice the tolerance is flagged.
    shifted = {s: v + 2 * agreement.tolerance for s, v in tp.items()}
    assert not compare_curves("shifted", dp, shifted).agrees
    assert not compare_curves("disjoint", dp, {100: 1.0}).agrees


def test_saved_models_load_generate_and_match_across_layouts(report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {}
    for run in (DP_RUN, TP_RUN):
        path = report["work"] / run / "final"
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info              # no missing / unexpected / mismatched keys
        models[run] = model
    tok = AutoTokenizer.from_pretrained(report["work"] / TP_RUN / "final")
    enc = tok(["### Instruction:\nReturn the first word.\n\n### Response:\n"], return_tensors="pt")
    out = models[TP_RUN].generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    # The TP run's gathered weights equal the dp run's (same updates, see above) to float noise.
    dp_state, tp_state = models[DP_RUN].state_dict(), models[TP_RUN].state_dict()
    assert dp_state.keys() == tp_state.keys()
    worst = max((dp_state[k] - tp_state[k]).abs().max().item() for k in dp_state)
    assert worst < 1e-4, worst


def test_report_writes_figure_and_tables(report):
    out = report["out"]
    assert (out / "loss_curves.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| model before SFT |" in md and "| first_word |" in md and "| eval loss |" in md
    assert "TP2 x ZeRO-1 dp1" in md and "ZeRO-1 dp2" in md
    evals = report["results"]["eval"]
    assert evals["model before SFT"]["total"] == 7
    assert all(r["eval_loss"] < evals["model before SFT"]["eval_loss"] for r in report["results"]["rows"])


def test_layout_global_batch_arithmetic():
    from tp_trainer.app.report import seed_layouts

    layouts = seed_layouts(4)
    assert [(l.tp_size, l.dp_size, l.zero_stage, l.fsdp) for l in layouts] == [
        (1, 4, 1, False), (1, 4, 2, False), (1, 4, 0, True), (4, 1, 0, False), (2, 2, 1, False), (2, 2, 2, False)]
    # gbs = per_device x world / tp x grad_accum, the same 16 for every layout
    assert all(l.per_device_batch(16) * l.nproc // l.tp_size == 16 for l in layouts)
    with pytest.raises(ValueError, match="not divisible by dp=4"):
        layouts[0].per_device_batch(10)


def test_eval_command_prints_the_before_after_table(report, capsys):
    from tp_trainer.commands.eval import main

    builtin = report["work"] / "builtin"
    before = next(p for p in builtin.iterdir() if p.name.startswith("tiny-llama-"))
    data = next(builtin.glob("tasks-*/eval.jsonl"))
    after = report["work"] / TP_RUN / "final"
    assert main([f"before SFT={before}", f"tp2={after}", "--data", str(data), "--limit", "7",
                 "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "| task | n | before SFT | tp2 |" in out and "| overall | 7 |" in out
    assert main([str(after), "--data", str(data / "missing.jsonl")]) == 2
    assert main([str(builtin), "--data", str(data)]) == 2
    assert "not a saved model directory" in capsys.readouterr().err


def test_report_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    """The figures need matplotlib; without it the report stops at once with the install command
    instead of after its training runs (no run directory is created)."""
    from tp_trainer.commands import report as report_cmd

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r"pip install 'tp_trainer\[report\]'"):
        report_cmd.main(["--recipe", DEFAULT, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
