"""Recipes: YAML + command-line parsing through one HfArgumentParser, validation, launcher command."""

from __future__ import annotations

import glob
import os
import re

import pytest

from tp_trainer.app.launch import check_nproc, launcher_command, launcher_env, under_launcher
from tp_trainer.app.recipe import parse_recipe, peek, read_recipe_file, world_size_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "recipes", "tiny-sft.yaml")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def parse(argv, world=None):
    """Parse as a rank of the recipe's world would (TPTrainingArguments checks WORLD_SIZE % tp_size)."""
    world = world or peek(argv, "nproc_per_node") or peek(argv, "tp_size") or 1
    with world_size_env(world):
        return parse_recipe(argv)


def test_default_recipe_fields():
    r = parse([DEFAULT])
    assert r.model.model_name_or_path == "tiny-llama"
    assert (r.training.tp_size, r.training.zero_stage, r.job.nproc_per_node) == (2, 1, 2)
    assert r.data.train_file is None and r.data.max_length == 128
    assert r.training.max_steps == 1000 and r.training.learning_rate == pytest.approx(2e-3)


def test_command_line_overrides_yaml():
    r = parse([DEFAULT, "--max_steps", "7", "--tp_size", "1", "--zero_stage", "2", "--packing", "true",
               "--dtype", "bfloat16", "--learning_rate", "1e-4", "--nproc_per_node", "4"])
    assert (r.training.max_steps, r.training.tp_size, r.training.zero_stage) == (7, 1, 2)
    assert r.data.packing is True and r.model.dtype == "bfloat16"
    assert r.training.learning_rate == pytest.approx(1e-4) and r.job.nproc_per_node == 4
    # fields the override did not name keep their YAML values
    assert r.training.per_device_train_batch_size == 64 and r.data.generated_seed == 1234


def test_flags_without_a_recipe_file_use_dataclass_defaults():
    r = parse(["--output_dir", "x", "--max_steps", "3"])
    assert r.model.model_name_or_path == "tiny-llama" and r.training.tp_size == 1 and r.training.max_steps == 3


@pytest.mark.parametrize("override, message", [
    (["--zero_stage", "4"], "zero_stage must be 0, 1, 2 or 3"),
    (["--dtype", "float8"], "dtype must be one of"),
    (["--generated_tasks", "add,divide"], "unknown task(s) ['divide']"),
    (["--max_length", "4"], "max_length must be >= 8"),
    (["--nproc_per_node", "0"], "nproc_per_node must be >= 1"),
])
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ValueError) as err:
        parse([DEFAULT, *override], world=2)
    assert message in str(err.value)


def test_world_not_divisible_by_tp_is_an_error():
    with pytest.raises(ValueError, match="WORLD_SIZE=3 is not divisible by tp_size=2"):
        parse([DEFAULT], world=3)
    with pytest.raises(ValueError, match="nproc_per_node=3 is not a positive multiple of tp_size=2"):
        check_nproc(3, 2)


def test_unknown_yaml_key_names_the_key_and_a_close_match(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tp_size: 2\nzero_stag: 1\n")
    with pytest.raises(ValueError, match=r"unknown field 'zero_stag' \(did you mean 'zero_stage'\?\)"):
        parse([str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        parse([str(bad)])
    with pytest.raises(ValueError, match="does not exist"):
        parse([str(tmp_path / "missing.yaml")])


def test_train_command_rejects_a_bad_recipe_before_launching(capsys, tmp_path):
    from tp_trainer.commands.train import main

    assert main([DEFAULT, "--zero_stage", "5", "--output_dir", str(tmp_path)]) == 2
    assert "zero_stage must be 0, 1, 2 or 3, got 5" in capsys.readouterr().err
    assert main([DEFAULT, "--train_file", str(tmp_path / "nope.json"), "--model_name_or_path", str(tmp_path),
                 "--output_dir", str(tmp_path)]) == 2
    assert "nope.json' does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "final")


def parse_on_this_machine(path):
    """Parse a GPU recipe here: ``use_cpu`` lets bf16 validate on a CPU, and ``tp_size 1`` in a 1-process
    world keeps accelerate from joining the recipe's (absent) 8-process group; tp_size is checked from the YAML."""
    return parse([path, "--use_cpu", "true", "--tp_size", "1"], world=1), read_recipe_file(path)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_parses_and_states_its_global_batch(path):
    r, raw = parse_on_this_machine(path)
    t, tp, nproc = r.training, raw.get("tp_size", 1), r.job.nproc_per_node
    assert nproc % tp == 0
    gbs = t.per_device_train_batch_size * nproc // tp * t.gradient_accumulation_steps
    # The comment spells the arithmetic out: "= per_device x n_gpus / tp x accum = gbs".
    text = open(path).read()
    match = re.search(r"=\s*(\d+) x \(?(\d+) / (\d+)\)? x (\d+)\s*=\s*(\d+)", text)
    assert match, f"{path} must state 'gbs = per_device x n_gpus / tp_size x grad_accum = N' in a comment"
    assert tuple(int(g) for g in match.groups()) == (
        t.per_device_train_batch_size, nproc, tp, t.gradient_accumulation_steps, gbs)


def test_real_model_recipes_cover_the_seed_setup():
    seed, raw = parse_on_this_machine(os.path.join(ROOT, "recipes", "llama2-7b-alpaca-tp4-zero1.yaml"))
    assert (raw["tp_size"], seed.training.zero_stage, seed.job.nproc_per_node) == (4, 1, 8)
    assert seed.training.bf16 and seed.training.gather_16bit_weights_on_model_save
    names = {os.path.basename(p) for p in RECIPES}
    assert {"tiny-sft.yaml", "llama3-8b-tp4.yaml", "qwen2.5-7b-tp4.yaml"} <= names


def test_launcher_command_uses_torch_elastic_with_monitor_interval():
    cmd = launcher_command(["train", "r.yaml", "--max_steps", "3"], 4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and "--monitor-interval=5" in cmd
    assert cmd[-6:] == ["tp_trainer.cli", "train", "r.yaml", "--max_steps", "3"][-6:] or \
        cmd[-5:] == ["tp_trainer.cli", "train", "r.yaml", "--max_steps", "3"]
    env = launcher_env(4, environ={})
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert launcher_env(4, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    assert under_launcher({"RANK": "0", "WORLD_SIZE": "2"}) and not under_launcher({})


# ---------------------------------------------------------------------------------------- trainer: dpo
DPO = os.path.join(ROOT, "recipes", "tiny-dpo.yaml")


def test_dpo_recipe_parses_into_tpdpoconfig():
    from tp_trainer.app.recipe import PreferenceDataArguments
    from tp_trainer.trl import TPDPOConfig

    r = parse([DPO])
    assert r.job.trainer == "dpo" and isinstance(r.training, TPDPOConfig)
    assert isinstance(r.data, PreferenceDataArguments) and not hasattr(r.data, "max_length")
    assert (r.training.tp_size, r.training.zero_stage, r.job.nproc_per_node) == (2, 1, 2)
    assert r.training.beta == pytest.approx(0.1) and r.training.max_length == r.max_length == 128
    assert not r.training.bf16 and not r.training.activation_checkpointing
    overridden = parse([DPO, "--beta", "0.3", "--max_length", "64", "--loss_type", "ipo"])
    assert overridden.training.beta == pytest.approx(0.3) and overridden.max_length == 64
    assert overridden.training.loss_type == ["ipo"]
    assert parse([DEFAULT]).job.trainer == "sft" and parse([DEFAULT, "--trainer", "sft"]).max_length == 128


def test_a_field_of_the_other_trainer_or_an_unknown_trainer_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tp_size: 2\nbeta: 0.1\n")
    with pytest.raises(ValueError, match="field 'beta' belongs to trainer: dpo, and this recipe trains trainer: sft"):
        parse([str(bad)], world=2)
    bad.write_text("trainer: dpo\npacking: true\n")
    with pytest.raises(ValueError, match="field 'packing' belongs to trainer: sft, and this recipe trains trainer: dpo"):
        parse([str(bad)])
    with pytest.raises(ValueError, match=r"trainer must be one of \('sft', 'dpo'\), got 'ppo'"):
        parse([DEFAULT, "--trainer", "ppo"], world=2)


def test_preference_pairs_from_alpaca_records(tmp_path):
    import json
    import random

    from tp_trainer.app.data.preference import corrupt, load_preferences
    from tp_trainer.app.data.sft import format_prompt
    from tp_trainer.app.data.tasks import generate_tasks

    rng = random.Random(0)
    for answer in ("7", "1 3 5 8", "d e r", "Alpha", "12"):
        wrong = corrupt(answer, rng)
        diff = [(a, b) for a, b in zip(answer, wrong) if a != b]
        assert len(wrong) == len(answer) and len(diff) == 1  # one character changed, of the same kind
        (a, b), = diff
        assert a.isdigit() == b.isdigit() and a.isupper() == b.isupper()
    records = generate_tasks(30, seed=1, tasks=["add_digits", "reverse", "first_word"])
    alpaca = tmp_path / "train.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = load_preferences(str(alpaca), seed=5)
    assert len(pairs) == 30 and pairs.column_names == ["prompt", "chosen", "rejected"]
    for record, pair in zip(records, pairs):
        assert pair["prompt"] == format_prompt(record) and pair["chosen"] == record["output"]
        assert pair["rejected"] != record["output"]
    assert load_preferences(str(alpaca), seed=5)["rejected"] == pairs["rejected"]  # every rank builds the same
    given = tmp_path / "pairs.json"
    given.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1}]))
    assert load_preferences(str(given), seed=0)[0] == {"prompt": "p", "chosen": "a", "rejected": "b"}
    given.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match=r"records need the keys \('prompt', 'chosen', 'rejected'\)"):
        load_preferences(str(given), seed=0)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """``tp-trainer train recipes/tiny-dpo.yaml`` from a plain process: it launches its own 2-rank world (tp=2)."""
    import subprocess
    import sys

    from distributed import skip_unless_world_fits

    skip_unless_world_fits(2)
    out = tmp_path_factory.mktemp("dpo") / "run"
    cmd = [sys.executable, "-m", "tp_trainer.cli", "train", DPO, "--output_dir", str(out), "--max_steps", "40",
           "--logging_steps", "4", "--per_device_train_batch_size", "16", "--generated_train_size", "640",
           "--generated_eval_size", "16", "--eval_steps", "40", "--warmup_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def test_dpo_recipe_trains_at_tp2_and_its_rewards_rise(dpo_run):
    import json

    from transformers import AutoModelForCausalLM

    out, stdout = dpo_run
    assert "world=2 = dp 1 x tp 2" in stdout and "DPO progress" in stdout
    history = json.loads((out / "log_history.json").read_text())
    accuracies = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert len(accuracies) == 10 and any("eval_rewards/accuracies" in h for h in history)
    # deterministic (seeded data, weights and order on CPU): the first 4 steps start at the reference (reward 0)
    assert sum(accuracies[-3:]) / 3 > sum(accuracies[:3]) / 3 + 0.1, accuracies
    assert margins[-1] > margins[0] + 0.15  # observed 0.01 -> 0.26
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # save_model gathered the shards
    assert model.config.vocab_size == model.get_output_embeddings().weight.shape[0]
