"""``TPTrainer.save_model``: TP (and ZeRO) shards gathered into an ordinary Hugging Face model directory.

A 2-rank world trains tp=2 models for two steps (so no weight is at its initial value), saves
them and returns the gathered weights and the TP model's logits; this process then loads the
directories with ``AutoModelForCausalLM.from_pretrained`` as any user would.

Tolerances: the fp32 export holds the gathered weights exactly, so its logits differ from the
TP model's only by the summation order of the row-parallel/vocab-parallel products: 1e-5 on
logits of O(1). The bf16 export rounds every weight to 8 mantissa bits (relative error
<= 2^-9); through 2 layers that moves these logits (|logit| < 1.5) by ~2e-3 (measured on the
initial weights), so they are compared at 1e-2, while a shard in the wrong place moves them by
~1e-1; the weights themselves must equal the gathered fp32 weights cast to bf16 bit for bit.
"""

import json
import os

import pytest
import torch

from distributed import run_distributed
from models import tiny_model

pytestmark = pytest.mark.cpu_only(reason="the worlds train with use_cpu=True on CPU batches; not device-agnostic yet")

IDS = torch.tensor([[5, 17, 42, 8, 77, 3, 60, 21], [9, 9, 31, 64, 2, 90, 14, 50]])


def make_dataset(n=16, seq=8):
    import datasets

    ids = (torch.arange(n)[:, None] + torch.arange(seq)) % 93 + 3
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t1")


def trained(family, out, *, zero=0, dtype=torch.float32, **extra):
    from tp_trainer import TPTrainer, TPTrainingArguments

    args = TPTrainingArguments(output_dir=out, tp_size=2, zero_stage=zero, per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                               **extra)
    trainer = TPTrainer(model=tiny_model(family, dtype=dtype), args=args, train_dataset=make_dataset(),
                        processing_class=make_tokenizer())
    trainer.train()
    return trainer


def gathered(trainer):
    from tp_trainer.parallel.gather import iter_full_state

    return {n: t.clone() for n, t in iter_full_state(trainer.model, trainer.tp_context.tp_group)}


@torch.no_grad()
def tp_logits(trainer):
    trainer.model.eval()
    return trainer.model(input_ids=IDS).logits.float()


def save_world(base):
    from tp_trainer.checkpoint import export

    rank = int(os.environ["RANK"])
    out = {}
    llama = trained("llama", f"{base}/run-llama")
    llama.args.gather_16bit_weights_on_model_save = True
    llama.save_model(f"{base}/llama-bf16")
    llama.args.gather_16bit_weights_on_model_save = False
    llama.save_model(f"{base}/llama-fp32")
    out["llama"] = {"weights": gathered(llama), "logits": tp_logits(llama)}
    export.save_model(llama.model, f"{base}/written-by-rank{rank}", context=llama.tp_context, dtype=torch.float32,
                      is_main=llama.args.should_save)

    gemma = trained("gemma", f"{base}/run-gemma")  # tied embeddings
    export.save_model(gemma.model, f"{base}/gemma-sharded", context=gemma.tp_context, dtype=torch.float32,
                      max_shard_size="40KB", is_main=gemma.args.should_save)
    out["gemma"] = {"weights": gathered(gemma), "logits": tp_logits(gemma)}

    mixed = trained("llama", f"{base}/run-bf16-zero1", zero=1, dtype=torch.bfloat16)  # fp32 masters over dp
    mixed.save_model(f"{base}/bf16-weights-default")
    mixed.args.gather_16bit_weights_on_model_save = False
    mixed.save_model(f"{base}/bf16-weights-as-fp32")
    out["mixed"] = {"weights": gathered(mixed)}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("save_model"))
    return base, run_distributed(save_world, 2, base)[0]


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert info["error_msgs"] == []
    return model.eval()


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.float()


def test_bf16_save_is_the_gathered_weights_rounded(world):
    base, out = world
    model = load(f"{base}/llama-bf16")
    assert model.dtype == torch.bfloat16
    with open(f"{base}/llama-bf16/config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    weights = out["llama"]["weights"]
    loaded = dict(model.named_parameters())
    assert loaded.keys() == weights.keys()
    for name, full in weights.items():
        assert torch.equal(loaded[name].detach(), full.to(torch.bfloat16)), name
    torch.testing.assert_close(logits(load(f"{base}/llama-bf16", dtype=torch.float32)), out["llama"]["logits"],
                               rtol=0, atol=1e-2)


def test_fp32_save_reproduces_the_tp_model(world):
    base, out = world
    model = load(f"{base}/llama-fp32")
    assert model.dtype == torch.float32
    for name, full in out["llama"]["weights"].items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), full), name
    torch.testing.assert_close(logits(model), out["llama"]["logits"], rtol=0, atol=1e-5)


def test_directory_has_config_generation_config_and_tokenizer(world):
    base, _ = world
    files = set(os.listdir(f"{base}/llama-bf16"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training_args.bin"} <= files
    from transformers import AutoTokenizer

    text = "t5 t17 t42"
    assert AutoTokenizer.from_pretrained(f"{base}/llama-bf16")(text)["input_ids"] == make_tokenizer()(text)["input_ids"]


def test_only_the_main_process_writes(world):
    base, _ = world
    assert os.path.isdir(f"{base}/written-by-rank0") and not os.path.exists(f"{base}/written-by-rank1")


def test_tied_weights_saved_once_and_large_models_sharded_with_an_index(world):
    base, out = world
    path = f"{base}/gemma-sharded"
    with open(f"{path}/model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map
    model = load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model), out["gemma"]["logits"], rtol=0, atol=1e-5)


def test_16bit_weights_with_fp32_masters(world):
    """bf16 weights + ZeRO-1: the default save keeps bf16; an fp32 save writes the fp32 masters."""
    base, out = world
    bf16 = load(f"{base}/bf16-weights-default")
    assert bf16.dtype == torch.bfloat16
    fp32 = load(f"{base}/bf16-weights-as-fp32")
    assert fp32.dtype == torch.float32
    finer = 0
    for name, weight in out["mixed"]["weights"].items():
        master = dict(fp32.named_parameters())[name].detach()
        assert torch.equal(dict(bf16.named_parameters())[name].detach(), weight), name
        assert torch.equal(master.to(torch.bfloat16), weight), name  # the bf16 weights are the masters rounded
        finer += int((master != master.to(torch.bfloat16).float()).sum())
    assert finer > 0, "an fp32 save of a model with fp32 masters must keep their extra precision"


def test_save_dtype_rules():
    from types import SimpleNamespace

    from tp_trainer.checkpoint.export import resolve_save_dtype

    fp32_model, bf16_model = tiny_model("llama"), tiny_model("llama", dtype=torch.bfloat16)

    def args(flag=None, bf16=False, fp16=False):
        return SimpleNamespace(gather_16bit_weights_on_model_save=flag, bf16=bf16, fp16=fp16)

    assert resolve_save_dtype(args(), fp32_model) == torch.float32
    assert resolve_save_dtype(args(bf16=True), fp32_model) == torch.bfloat16  # bf16 training asks for 16-bit
    assert resolve_save_dtype(args(flag=True), fp32_model) == torch.bfloat16  # the seed's flag
    assert resolve_save_dtype(args(flag=True, fp16=True), fp32_model) == torch.float16
    assert resolve_save_dtype(args(flag=False, bf16=True), fp32_model) == torch.float32  # the flag wins
    assert resolve_save_dtype(args(flag=True), tiny_model("llama", dtype=torch.float16)) == torch.float16
    assert resolve_save_dtype(args(), bf16_model) == torch.bfloat16  # a 16-bit model stays 16-bit
    assert resolve_save_dtype(args(flag=False), bf16_model) == torch.float32  # ... unless fp32 is asked for
