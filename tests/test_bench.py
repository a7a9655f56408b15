"""scripts/bench.py: the correctness gate and the bookkeeping, not the speed (no timing assertions).

One short real run (a tiny Llama, single process vs tp=2 under torchrun, one step after one
warm-up) checks that the gate passes for a correct layout, that the memory the benchmark
measures equals the theory and that the tp=2 collectives are counted; fabricated records
check that a wrong loss is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench", None)


def _record(losses, dp_rank=0, dp_size=1):
    mem = {"params": 100, "grads": 100, "optimizer": 200, "rest": 50, "peak_rss_delta": 450, "peak_live": 420}
    return {"losses": losses, "times": [1.0, 1.2], "cpu_times": [1.0, 1.1], "memory": mem,
            "comm_bytes": {"all_reduce": 8}, "comm_calls": {"all_reduce": 2}, "dp_rank": dp_rank, "dp_size": dp_size}


def test_gate_refuses_a_wrong_loss_and_averages_dp_halves(bench):
    cfg = bench.BenchConfig(steps=2, warmup=1)
    reference = [8.0, 7.5, 7.0]
    good = bench.summarize("dp2", "fp32", [[_record([7.9, 7.4, 6.9], 0, 2), _record([8.1, 7.6, 7.1], 1, 2)]],
                           cfg, reference)
    assert good["loss_ok"] and good["loss_max_abs_diff"] < 1e-9  # mean of the dp halves
    bad = bench.summarize("tp2", "fp32", [[_record([8.0, 7.5, 7.01])] * 2], cfg, reference)
    assert not bad["loss_ok"]  # 1e-2 off in fp32 is a bug, not rounding
    assert "refused" in bench.format_table([good, bad]).splitlines()[3]
    assert bench.ratios([bad]) == []  # no speed ratio for a wrong result


def test_ratios_pair_the_launches_of_each_round(bench):
    # tp2 and DeepSpeed launched back to back in 3 rounds; the machine slowed down by 20% during
    # round 2 and sped up between round 3's two launches: per-round ratios 0.6, 0.6, 0.75, median
    # 0.6. Pooling each runner's rounds first would divide 0.72 by 1.0.
    rows = [{"runner": "tp2", "dtype": "fp32", "loss_ok": True, "round_step_s": [0.6, 0.72, 0.75],
             "round_cpu_s": [0.6, 0.7, 0.7], "round_min_s": [0.55, 0.6, 0.7]},
            {"runner": "deepspeed_autotp", "dtype": "fp32", "loss_ok": True, "round_step_s": [1.0, 1.2, 1.0],
             "round_cpu_s": [0.9, 1.0, 1.0], "round_min_s": [0.9, 1.0, 1.0]},
            {"runner": "single", "dtype": "fp32", "loss_ok": True, "round_step_s": [1.0, 1.2, 1.2],
             "round_cpu_s": [1.0, 1.2, 1.2], "round_min_s": [1.0, 1.1, 1.0]}]
    got = {t["what"]: t for t in bench.ratios(rows)}
    ds = got["tp2 / deepspeed_autotp"]
    assert ds["per_round"] == pytest.approx([0.6, 0.6, 0.75]) and ds["ratio"] == pytest.approx(0.6)
    assert ds["target"] == 0.7 and "ok" in bench.format_ratio(ds)
    assert got["tp2 / (single / 2)"]["per_round"] == pytest.approx([1.2, 1.2, 1.25])
    assert got["tp2 / deepspeed_autotp, CPU time"]["target"] is None
    fastest = got["tp2 / (single / 2), fastest steps"]
    assert fastest["target"] is None and fastest["per_round"] == pytest.approx([1.1, 12 / 11, 1.4])
    # the compared runners go first in every round, back to back
    order = bench._run_order(["single", "dp2", "tp2", "tp2_zero1"], ["deepspeed_autotp", "hf_native_tp"])
    assert order == ["single", "tp2", "deepspeed_autotp", "hf_native_tp", "dp2", "tp2_zero1"]


@pytest.mark.cpu_only(reason="scripts/bench.py is a CPU benchmark: gloo under torchrun, host memory, CPU attention")
def test_short_real_run_passes_the_gate(bench, tmp_path):
    out = tmp_path / "bench.json"
    code = bench.main(["--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                       "--vocab", "128", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1",
                       "--rounds", "1", "--layouts", "single", "tp2", "--dtypes", "fp32", "--peers", "none",
                       "--out", str(out)])
    assert code == 0
    rows = {r["runner"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"single", "tp2"}
    assert rows["tp2"]["loss_ok"] and rows["tp2"]["loss_max_abs_diff"] <= bench.LOSS_TOL["fp32"]
    for row in rows.values():
        assert row["theory_ratio"] == pytest.approx(1.0, abs=0.05)  # the 5% bound on live state
        assert row["peak_theory_ratio"] == pytest.approx(1.0, abs=0.10)  # and its 10% on the estimate
    # tp=2 collectives of one whole step, each counted once: 2 per layer forward (attention
    # and MLP outputs, row-parallel) + the vocab-parallel embedding, 2 per layer backward (the
    # shared q/k/v and gate/up input gradients) + the LM head's input gradient, all [B, S, H]
    # fp32 all-reduces; and the vocab-parallel loss's one all-gather of (local log-sum-exp,
    # target logit) over the B*S tokens from each of the 2 ranks (counted as the gathered output);
    # then clipping's one fp32 scalar (the squared norm summed over TP). The fp32 norms stay
    # replicated (only 16-bit ones are split over tokens, planner/apply.py), so there is no other
    # all-gather, and dp = 1: nothing else.
    layers, tokens, hidden = 2, 2 * 16, 64
    activations = (4 * layers + 2) * tokens * hidden * 4 + 4
    loss_gather = 2 * 2 * tokens * 4
    comm = rows["tp2"]["comm_bytes_per_rank"]
    if "all_reduce_shm" in comm:
        assert comm == {"all_reduce_shm": activations, "all_gather_shm": loss_gather}, comm
        # the transport's waiting clock: a duration within the step that contains it
        assert 0.0 <= rows["tp2"]["median_wait_s"] <= max(rows["tp2"]["step_times"])
    else:
        assert comm == {"all_reduce": activations, "all_gather": loss_gather}, comm
    assert rows["single"]["comm_bytes_per_rank"] == {} and "median_wait_s" not in rows["single"]


def test_compile_refuses_eager_peers_before_any_work(bench, tmp_path):
    # --compile 1 compiles our layouts only: a ratio to an eager peer would not compare like with like
    with pytest.raises(SystemExit, match="--peers none"):
        bench.main(["--compile", "1", "--peers", "hf_native_tp", "--out", str(tmp_path / "bench.json")])
    assert not (tmp_path / "bench.json").exists()
