"""``tp-trainer export CHECKPOINT_DIR OUT_DIR [--dtype ...]``: a sharded checkpoint -> HF model dir, one process.

A 2-rank world trains a tp=2 model with bf16 weights and ZeRO-1 fp32 masters for two steps,
writes ``checkpoint-2`` and, for comparison, ``save_model``'s directory. Exports are exact
(no arithmetic, only re-assembly and casts), so every comparison here is bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from models import tiny_model
from test_save_model import load, make_dataset, make_tokenizer

pytestmark = pytest.mark.cpu_only(reason="the worlds train with use_cpu=True on CPU batches; not device-agnostic yet")


def checkpoint_world(base):
    from tp_trainer import TPTrainer, TPTrainingArguments

    args = TPTrainingArguments(output_dir=f"{base}/run", tp_size=2, zero_stage=1, per_device_train_batch_size=4,
                               max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2,
                               use_cpu=True, disable_tqdm=True, gather_16bit_weights_on_model_save=True)
    trainer = TPTrainer(model=tiny_model("llama", dtype=torch.bfloat16), args=args, train_dataset=make_dataset(),
                        processing_class=make_tokenizer())
    trainer.train()
    trainer.save_model(f"{base}/save_model")
    return True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("export"))
    run_distributed(checkpoint_world, 2, base)
    return base


def export(*argv):
    from tp_trainer.cli import main

    return main(["export", *argv])


def params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def test_default_export_equals_save_model(ckpt, tmp_path):
    assert export(f"{ckpt}/run/checkpoint-2", str(tmp_path / "out")) == 0
    got, want = params(load(tmp_path / "out")), params(load(f"{ckpt}/save_model"))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files


def test_fp32_export_uses_the_fp32_masters(ckpt, tmp_path):
    assert export(f"{ckpt}/run/checkpoint-2", str(tmp_path / "fp32"), "--dtype", "fp32") == 0
    fp32, bf16 = params(load(tmp_path / "fp32")), params(load(f"{ckpt}/save_model"))
    finer = 0
    for name, master in fp32.items():
        assert master.dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), bf16[name]), name  # the weights are the masters rounded
        finer += int((master != master.to(torch.bfloat16).float()).sum())
    assert finer > 0


def test_sharded_export_with_index(ckpt, tmp_path):
    assert export(f"{ckpt}/run/checkpoint-2", str(tmp_path / "sharded"), "--max-shard-size", "20KB") == 0
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    load(tmp_path / "sharded")


def test_errors_name_the_problem(ckpt, tmp_path, capsys):
    assert export(str(tmp_path / "nowhere"), str(tmp_path / "o")) == 1
    assert "nowhere is not a directory" in capsys.readouterr().err
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(f"{ckpt}/run/checkpoint-2", bad)
    os.truncate(bad / "model-tp01-of-02.safetensors", 10)
    assert export(str(bad), str(tmp_path / "o")) == 1
    assert "model-tp01-of-02.safetensors is truncated" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(SystemExit):
        export(f"{ckpt}/run/checkpoint-2", str(tmp_path / "o"), "--dtype", "int8")


def test_console_script_in_a_fresh_process(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "tp_trainer.cli", "export", f"{ckpt}/run/checkpoint-2",
                           str(tmp_path / "cli"), "--dtype", "bf16"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(bfloat16)" in done.stdout
    load(tmp_path / "cli")
