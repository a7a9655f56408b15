"""The library imports and trains without ``datasets`` (only the application, ``tp-trainer train``/``eval``, needs it),
and without the optional extras ``trl`` and ``peft``, whose absence is an error naming the extra where one is needed.

The GPU image these tests also run on (scripts/gpu_check.sh) has no ``datasets``. Here a fresh
interpreter sets ``sys.modules["datasets"] = None``: ``import datasets`` raises ImportError and
``importlib.util.find_spec("datasets")`` returns None, which is what transformers' and accelerate's
availability checks see when the package is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from distributed import TEST_DEVICE

WITHOUT_DATASETS = textwrap.dedent("""
    import sys
    sys.modules["datasets"] = None  # as if not installed
    sys.modules["trl"] = None  # the optional extras too
    sys.modules["peft"] = None

    import tp_trainer
    from tp_trainer import (ParallelContext, TPTrainer, TPTrainingArguments, apply_tensor_parallel,
                            plan_tensor_parallel)
    import tp_trainer.checkpoint, tp_trainer.checkpoint.export, tp_trainer.zero
    import tp_trainer.app.data.tasks, tp_trainer.app.data.tokenizer  # the data helpers that need no datasets

    import torch
    import transformers
    from transformers.utils import is_datasets_available

    assert not is_datasets_available()
    # TPTrainer (ZeRO-1 over a 1-process world) on a torch Dataset: the Trainer side takes no datasets either
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    ids = torch.randint(0, 64, (8, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TPTrainingArguments(output_dir=sys.argv[1], zero_stage=1, per_device_train_batch_size=4, max_steps=2,
                               report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=sys.argv[2] == "cpu")
    trainer = TPTrainer(model=transformers.LlamaForCausalLM(config), args=args, train_dataset=data)
    trainer.train()
    assert trainer.tp_context.device.type == sys.argv[2], trainer.tp_context.device
    assert sys.modules["datasets"] is None, "something imported datasets behind the block"
    print("OK", trainer.state.global_step)
""")


def test_library_imports_and_trains_without_datasets(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single process
    out = subprocess.run([sys.executable, "-c", WITHOUT_DATASETS, str(tmp_path), TEST_DEVICE], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "OK 2"


# trl and peft are optional extras: the library imports and trains without them (the block above trains with
# neither importable as well), and what needs one says which extra installs it, before any work
WITHOUT_TRL = textwrap.dedent("""
    import sys
    sys.modules["trl"] = None  # as if not installed
    sys.modules["peft"] = None

    import tp_trainer
    from tp_trainer import TPArgumentsMixin, TPTrainer, TPTrainerMixin, TPTrainingArguments
    import tp_trainer.trainer, tp_trainer.app.recipe
    from tp_trainer.extras import require

    try:
        import tp_trainer.trl
    except ImportError as err:
        assert 'tp_trainer.trl needs trl, which is not installed: pip install "tp_trainer[trl]"' in str(err), err
    else:
        raise AssertionError("tp_trainer.trl imported without trl")
    try:
        require("peft", feature="peft_config")
    except ImportError as err:
        assert 'peft_config needs peft, which is not installed: pip install "tp_trainer[peft]"' in str(err), err
    else:
        raise AssertionError("peft required without peft")
    from tp_trainer.commands.train import main

    assert main([sys.argv[1], "--output_dir", sys.argv[2]]) == 2  # trainer: dpo, refused before any work
    print("OK")
""")

WITHOUT_PEFT = textwrap.dedent("""
    import sys
    sys.modules["peft"] = None

    import transformers
    from tp_trainer.trl import TPSFTConfig, TPSFTTrainer

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    try:
        TPSFTTrainer(model=transformers.LlamaForCausalLM(config), args=TPSFTConfig(output_dir=sys.argv[1], use_cpu=True),
                     peft_config=object())
    except ImportError as err:
        assert 'peft_config needs peft, which is not installed: pip install "tp_trainer[peft]"' in str(err), err
    else:
        raise AssertionError("a peft_config was accepted without peft")
    print("OK")
""")


def _run_script(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_trl_or_peft_is_an_error_naming_the_extra(tmp_path):
    out = _run_script(WITHOUT_TRL, "recipes/tiny-dpo.yaml", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "OK"
    assert 'trainer: dpo needs trl, which is not installed: pip install "tp_trainer[trl]"' in out.stderr
    assert not (tmp_path / "run").exists()  # nothing generated, nothing launched
    out = _run_script(WITHOUT_PEFT, tmp_path / "sft")
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "OK"
