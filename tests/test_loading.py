"""Shard-only loading (tp_trainer/loading): each rank reads only its slices and gets exactly what full loading gives.

The reference is today's path: ``from_pretrained`` of the whole model, ``plan_tensor_parallel``,
``apply_tensor_parallel``, on the same ranks of the same world. Loading reorders no arithmetic
(slices are copied, casts are per element), so every comparison is exact: each rank's parameters
and buffers bit for bit (bytes compared, dtype and shape equal), the same tensors tied, the same
``tp_spec``, the same plan, and the loss of one forward on the same batch (the same modules
reading the same values in the same order). Families: every one of tests/models.py at tp=2
(dense, tied embeddings, fused projections, MoE with per-expert checkpoint keys fused on load,
encoders and encoder-decoders), from single-file, 16-bit and sharded (index) checkpoints, and
checkpoints transformers renames or converts on load (``key_mapping``, legacy ``gamma``/``beta``,
registered ``Chunk``/``Transpose`` conversions), all in one spawned world (the ``world`` fixture).
Each rank reads from the files exactly the bytes it holds (MoE experts included), except where a
conversion has no lazy form.

Memory (cpu_only): a rank's peak resident memory while loading a 126 MB bf16 Llama at tp=2 is
bounded by its shard, plus one full tensor, plus what loading a same-depth tiny model costs
(the machinery: the meta model, the planner's traces) measured in the same process, plus 16 MiB
(see ``test_peak_memory_is_the_shard_plus_one_tensor``); and it is below the full model's bytes.

Errors: a missing tensor, a wrong shape, a missing expert, a missing or truncated file name the
tensor and the file, and are raised before a single weight is read.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers as T
from distributed import run_distributed
from models import ALL_FAMILIES, ENCODERS, MOE_FAMILIES, tiny_encoder, tiny_model
from safetensors.torch import load_file, save_file

from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
from tp_trainer.loading import LoadError, from_pretrained, sharded_state
from tp_trainer.loading.files import SafetensorsDir
from tp_trainer.loading.materialize import tensor_aliases

MiB = 2 ** 20
# Forward parity on these (a causal LM batch; MLM for BERT): one of each kind the issue names.
FORWARD = {"llama", "llama_bf16_sharded", "gpt2", "mixtral", "qwen2_moe", "bert_mlm"}
QKV = "model.layers.{}.self_attn.qkv_proj.weight"
DOWN_T = "model.layers.{}.mlp.down_proj_t.weight"
CONVERTED = "llama_converted"  # loaded last in the world: its conversions are registered for LlamaForCausalLM


def _moe(name):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(MOE_FAMILIES[name]())


def _rewrite(path, edit, fname="model.safetensors"):
    tensors = load_file(os.path.join(path, fname))
    edit(tensors)
    save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})


def _fuse_qkv_transpose_down(t):
    """The layout :func:`_register_llama_conversions` converts: q/k/v in one tensor, down_proj transposed."""
    for i in range(2):
        t[QKV.format(i)] = torch.cat([t.pop(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv"])
        t[DOWN_T.format(i)] = t.pop(f"model.layers.{i}.mlp.down_proj.weight").t().contiguous()


def _register_llama_conversions():
    """A checkpoint layout transformers converts on load: q/k/v fused in one tensor (``Chunk``: one source, three
    targets, no lazy form) and ``down_proj`` stored transposed (``Transpose``: read lazily, the box transposed)."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, Transpose, WeightConverter

    register_checkpoint_conversion_mapping("LlamaForCausalLM", [
        WeightConverter("self_attn.qkv_proj.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                      "self_attn.v_proj.weight"], operations=[Chunk(dim=0)]),
        WeightConverter("mlp.down_proj_t.weight", "mlp.down_proj.weight", operations=[Transpose(0, 1)]),
    ], overwrite=True)


def _checkpoints(root) -> list[tuple[str, str, str, dict]]:
    """``(name, directory, model class, from_pretrained kwargs)``: every family saved with ``save_pretrained``,
    16-bit and sharded ones, then checkpoints transformers renames or converts on load."""
    out = []

    def save(name, model, kwargs=None, **save_kwargs):
        path = os.path.join(root, name)
        model.save_pretrained(path, **save_kwargs)
        out.append((name, path, "AutoModelForCausalLM" if name not in ENCODERS else type(model).__name__,
                    kwargs or {}))
        return path

    for fam in ALL_FAMILIES:
        save(fam, tiny_model(fam))
    save("llama_bf16_sharded", tiny_model("llama", dtype=torch.bfloat16), max_shard_size="20KB")
    for fam in MOE_FAMILIES:
        save(fam, _moe(fam))
    save("mixtral_bf16_sharded", _moe("mixtral").to(torch.bfloat16), max_shard_size="30KB")
    for name in ENCODERS:
        save(name, tiny_encoder(name))
    mapped = save("llama_key_mapping", tiny_model("llama"), {"key_mapping": {r"^backbone\.": "model."}})
    _rewrite(mapped, lambda t: t.update({k.replace("model.", "backbone.", 1): t.pop(k) for k in list(t)
                                         if k.startswith("model.")}))
    legacy = os.path.join(root, "bert_legacy_names")
    tiny_encoder("bert_mlm").save_pretrained(legacy)
    out.append(("bert_legacy_names", legacy, "BertForMaskedLM", {}))
    _rewrite(legacy, lambda t: t.update({k.replace("LayerNorm.weight", "LayerNorm.gamma")
                                         .replace("LayerNorm.bias", "LayerNorm.beta"): t.pop(k) for k in list(t)
                                         if "LayerNorm." in k}))
    converted = save(CONVERTED, tiny_model("llama", num_key_value_heads=4))  # MHA: q, k, v chunk evenly
    _rewrite(converted, _fuse_qkv_transpose_down)
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


def _compare(loaded, full, plan, ctx, full_parameters) -> list[str]:
    """Every difference between the shard-only model and the fully loaded then sharded one (empty: none)."""
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
    state = sharded_state(loaded, tp_size=ctx.tp_size)
    if state is None or state.context is not ctx or state.full_parameters != full_parameters:
        problems.append(f"marker: {state and (state.context is ctx, state.full_parameters)} vs {full_parameters}")
    for what in ("entries", "patches", "param_counts", "warnings"):
        if getattr(state.plan, what) != getattr(plan, what):
            problems.append(f"plan {what} differ")
    return problems


def _describe(src) -> tuple:
    """A source expression as nested tuples ``(kind, dim, shape, keys, children)`` (picklable)."""
    children = getattr(src, "items", None) or ([src.item] if hasattr(src, "item") else [])
    return (type(src).__name__, getattr(src, "dim", None), tuple(src.shape), tuple(src.keys()),
            tuple(_describe(c) for c in children))


def _expression_kinds(path) -> tuple[dict, dict]:
    """``({model tensor: its source described}, {parameter: shape})`` of the unsharded meta model of ``path``."""
    from tp_trainer.loading.build import build_meta_model
    from tp_trainer.loading.keys import map_sources

    files = SafetensorsDir(path)
    model, _ = build_meta_model(path, files, {})
    return ({n: _describe(src) for n, src in map_sources(model, files).sources.items()},
            {n: tuple(p.shape) for n, p in model.named_parameters()})


def _parity_worker(checkpoints):
    """Per checkpoint: shard-only against full load + plan + apply on the same ranks (differences, bytes read and
    held, losses of one forward); then, rank 0, the source expressions of two converted checkpoints."""
    ctx = ParallelContext.from_environment(2)
    reads = _counting_reads()
    report = {}
    for name, path, cls_name, kwargs in checkpoints:
        if name == CONVERTED:
            _register_llama_conversions()  # in this process only: both loaders see it (and every llama after it)
        cls = getattr(T, cls_name)
        reads["bytes"] = 0
        loaded = from_pretrained(path, context=ctx, model_class=cls, **kwargs)
        read_bytes, in_eval_mode = reads["bytes"], not loaded.training  # from_pretrained returns eval mode
        full = cls.from_pretrained(path, **kwargs)
        full_parameters = sum(p.numel() for p in full.parameters())
        plan = plan_tensor_parallel(full, 2)
        apply_tensor_parallel(full, plan, ctx)
        persistent = set(loaded.state_dict(keep_vars=True))
        held = sum(t.numel() * t.element_size() for names, t, _ in tensor_aliases(loaded)
                   if any(n in persistent for n in names))
        losses = None
        if name in FORWARD:
            full.to(ctx.device)
            loaded.train()
            full.train()
            batch = {k: v.to(ctx.device) for k, v in _batch(full).items()}
            losses = (loaded(**batch).loss.item(), full(**batch).loss.item())
        report[name] = {"problems": _compare(loaded, full, plan, ctx, full_parameters), "losses": losses,
                        "eval_mode": in_eval_mode, "read": read_bytes, "held": held,
                        "dtypes": sorted({str(p.dtype) for p in loaded.parameters()})}
    if ctx.rank == 0:
        paths = {name: path for name, path, *_ in checkpoints}
        report["expressions"] = {name: _expression_kinds(paths[name]) for name in ("mixtral", CONVERTED)}
    return report


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tp=2 world for every checkpoint of :func:`_checkpoints`: ``(checkpoints, reports of rank 0 and 1)``."""
    root = tmp_path_factory.mktemp("checkpoints")
    checkpoints = _checkpoints(root)
    return checkpoints, run_distributed(_parity_worker, 2, checkpoints)


def test_every_family_loads_bit_identical_to_full_load_then_shard(world):
    checkpoints, results = world
    root = os.path.dirname(checkpoints[0][1])
    with open(os.path.join(root, "llama_bf16_sharded", "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 2, "the sharded checkpoint must span several files"
    moe_keys = load_file(os.path.join(root, "mixtral", "model.safetensors"))
    assert any(".experts.3.w1." in k for k in moe_keys), "Mixtral checkpoints keep one tensor per expert"
    for rank, report in enumerate(results):
        assert {name for name, *_ in checkpoints} <= set(report)
        for name, *_ in checkpoints:
            rec = report[name]
            assert rec["problems"] == [], f"rank {rank}, {name}: {rec['problems']}"
            assert rec["eval_mode"], f"{name}: from_pretrained returns the model in eval mode"
            if rec["losses"] is not None:
                mine, ref = rec["losses"]
                assert mine == ref and math.isfinite(mine), f"rank {rank}, {name}: loss {mine} vs {ref}"
            # what was read from the files is exactly the checkpoint tensors this rank holds (no vocabulary
            # padding in these models; tied tensors once; non-persistent buffers computed, not read): MoE
            # experts included. A conversion without a lazy form (Chunk) reads its sources whole.
            if name != CONVERTED:
                assert rec["read"] == rec["held"], f"rank {rank}, {name}: read {rec['read']} bytes, holds {rec['held']}"
        for name in ("llama_bf16_sharded", "mixtral_bf16_sharded"):
            assert report[name]["dtypes"] == ["torch.bfloat16"], f"{name}: 16-bit weights must stay 16-bit"
    assert results[0]["llama"]["losses"] == results[1]["llama"]["losses"], "both ranks compute the same loss"


def test_renamed_legacy_and_converted_checkpoints_load_as_transformers_loads_them(world):
    """``key_mapping``, legacy ``gamma``/``beta`` names, and conversions with (``Transpose``) and without
    (``Chunk``) a lazy form: the same tensors as transformers' from_pretrained + apply_tensor_parallel (checked in
    the world with every family); here: that the checkpoints really hold the layouts named."""
    checkpoints, results = world
    paths = {name: path for name, path, *_ in checkpoints}
    assert "backbone.layers.0.mlp.up_proj.weight" in load_file(os.path.join(paths["llama_key_mapping"],
                                                                            "model.safetensors"))
    assert any("LayerNorm.gamma" in k for k in load_file(os.path.join(paths["bert_legacy_names"],
                                                                      "model.safetensors")))
    keys = load_file(os.path.join(paths[CONVERTED], "model.safetensors"))
    assert QKV.format(1) in keys and DOWN_T.format(1) in keys and "model.layers.1.self_attn.q_proj.weight" not in keys
    for rank, report in enumerate(results):
        for name in ("llama_key_mapping", "bert_legacy_names", CONVERTED):
            assert report[name]["problems"] == [], f"rank {rank}, {name}: {report[name]['problems']}"
        assert report[CONVERTED]["read"] > report[CONVERTED]["held"]  # q/k/v: the fused tensor read whole


def test_conversions_are_read_lazily_where_they_can_be(world):
    """Which expression each converted tensor gets: the MoE experts (stacked in expert order, gate and up
    concatenated) and a transposition are read box by box; a chunked fused tensor is read whole (the one
    case that costs its full sources)."""
    _, results = world
    sources, shapes = results[0]["expressions"]["mixtral"]
    kind, dim, shape, keys, items = sources["model.layers.1.mlp.experts.gate_up_proj"]
    assert (kind, dim) == ("Cat", 1) and shape == shapes["model.layers.1.mlp.experts.gate_up_proj"]
    assert [(i[0], len(i[4])) for i in items] == [("Stack", 4), ("Stack", 4)]
    assert items[0][3] == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight" for e in range(4))
    assert items[1][3] == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight" for e in range(4))
    kind, _, shape, _, items = sources["model.layers.1.mlp.experts.down_proj"]
    assert kind == "Stack" and len(items) == 4 and shape == shapes["model.layers.1.mlp.experts.down_proj"]
    sources, _ = results[0]["expressions"][CONVERTED]
    assert sources["model.layers.0.mlp.down_proj.weight"][0] == "Transposed"
    for p in "qkv":
        kind, _, shape, keys, _ = sources[f"model.layers.0.self_attn.{p}_proj.weight"]
        assert (kind, shape, keys) == ("Converted", (64, 64), (QKV.format(0),))


# ------------------------------------------------------------------------------------ memory
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _peak_added(fn):
    """``(fn(), peak resident bytes during fn - resident bytes before)``: the kernel's VmHWM, reset to the current
    RSS first (``/proc/self/clear_refs``). Loading maps no file: every byte counted is the process's own."""
    import gc

    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return out, _status("VmHWM") - before


def _memory_worker(tiny_path, big_path):
    ctx = ParallelContext.from_environment(2)
    from_pretrained(tiny_path, context=ctx)  # warm-up: lazy imports and caches the first load pays once
    _, machinery = _peak_added(lambda: from_pretrained(tiny_path, context=ctx))
    model, peak = _peak_added(lambda: from_pretrained(big_path, context=ctx))
    held = sum(t.numel() * t.element_size() for _, t, _ in tensor_aliases(model))
    files = SafetensorsDir(big_path)
    sizes = [torch.empty((), dtype=i.dtype).element_size() * int(torch.tensor(i.shape).prod())
             for i in files.tensors.values()]
    return {"machinery": machinery, "peak": peak, "held": held, "largest": max(sizes), "full": sum(sizes)}


def _llama_config(**kwargs):
    return T.LlamaConfig(num_hidden_layers=4, tie_word_embeddings=False, **kwargs)


@pytest.mark.cpu_only(reason="measures host (CPU) resident memory of the loading processes")
def test_peak_memory_is_the_shard_plus_one_tensor(tmp_path):
    """Bound: peak added <= held + largest tensor + machinery + BOUNCE_BYTES + 8 MiB, per rank.

    ``held``: the rank's shards and replicated tensors after loading; ``largest``: the largest checkpoint
    tensor (the issue's "one full tensor": a box in flight is at most that); ``machinery``: what loading the
    same 4-layer Llama at width 64 costs in the same process after a warm-up load (the meta model, the
    planner's meta traces: they do not depend on the width); ``BOUNCE_BYTES``: the reader's buffer for column
    splits (16 MiB, allocated only where rows are wide); 8 MiB for allocator rounding and the big model's
    larger shape tuples. The model: 126 MB of bf16 (hidden 1024, 4 layers, vocabulary 8000), so the bound
    (~63 + 16 + 16 + 8 MB + machinery) is well below the full model, and the peak is checked against that too.
    The measure is not vacuous: the peak must cover at least the bytes the rank holds.
    """
    from tp_trainer.loading.files import BOUNCE_BYTES

    tiny, big = os.path.join(tmp_path, "tiny"), os.path.join(tmp_path, "big")
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(_llama_config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                     num_key_value_heads=2, vocab_size=96),
                                       dtype=torch.bfloat16).save_pretrained(tiny)
    T.AutoModelForCausalLM.from_config(_llama_config(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                                                     num_key_value_heads=4, vocab_size=8000),
                                       dtype=torch.bfloat16).save_pretrained(big, max_shard_size="40MB")
    for rank, r in enumerate(run_distributed(_memory_worker, 2, tiny, big)):
        bound = r["held"] + r["largest"] + r["machinery"] + BOUNCE_BYTES + 8 * MiB
        summary = ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in r.items())
        assert r["peak"] <= bound, f"rank {rank}: peak added above the bound {bound / MiB:.1f} MiB: {summary}"
        assert r["peak"] >= r["held"], f"rank {rank}: the measure missed the weights it holds: {summary}"
        assert r["peak"] < 0.75 * r["full"], f"rank {rank}: shard-only loading came near the full model: {summary}"
        assert r["held"] < 0.55 * r["full"], summary


# ------------------------------------------------------------------------------------ errors and options
@pytest.fixture
def no_reads(monkeypatch):
    """Fail any read of tensor data: the errors below must come from headers and shapes alone."""
    def read(self, key, box=None):
        raise AssertionError(f"{key} was read before the checkpoint was checked")
    monkeypatch.setattr(SafetensorsDir, "read", read)


@pytest.fixture
def llama_dir(tmp_path):
    path = str(tmp_path / "llama")
    tiny_model("llama").save_pretrained(path)
    return path


def _load(path, **kwargs):
    return from_pretrained(path, context=ParallelContext.single(), **kwargs)


def test_a_missing_tensor_is_named_with_the_file_before_anything_is_read(llama_dir, no_reads):
    _rewrite(llama_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight \(64, 96\) is not in the "
                                        r"checkpoint .*" + os.path.join(llama_dir, "model.safetensors")):
        _load(llama_dir)


def test_a_shape_mismatch_names_tensor_file_and_both_shapes(llama_dir, no_reads):
    _rewrite(llama_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(LoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: checkpoint tensor "
                                        r"model\.layers\.0\.self_attn\.q_proj\.weight shape \(32, 64\) in "
                                        + os.path.join(llama_dir, "model.safetensors") + r", but this model's .* "
                                        r"has shape \(64, 64\)"):
        _load(llama_dir)


def test_a_missing_expert_names_the_fused_tensor_and_its_file(tmp_path, no_reads):
    path = str(tmp_path / "mixtral")
    _moe("mixtral").save_pretrained(path)
    _rewrite(path, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w1.weight"))
    with pytest.raises(LoadError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj is built from 7 checkpoint "
                                        r"tensors in \['" + os.path.join(path, "model.safetensors") + r"'\].* differ"):
        _load(path)


def test_missing_or_truncated_files_are_named(tmp_path, no_reads):
    sharded = str(tmp_path / "sharded")
    tiny_model("llama").save_pretrained(sharded, max_shard_size="40KB")
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(LoadError, match=r"model\.safetensors\.index\.json names \['" + victim + r"'\] but .* no such"):
        _load(sharded)
    single = str(tmp_path / "single")
    tiny_model("llama").save_pretrained(single)
    target = os.path.join(single, "model.safetensors")
    os.truncate(target, os.path.getsize(target) - 100)
    with pytest.raises(LoadError, match=target + r" is truncated or corrupted: tensor "):
        _load(single)
    with pytest.raises(LoadError, match="is not a local model directory"):
        _load(str(tmp_path / "no-such-model"))
    os.makedirs(tmp_path / "bin-only")
    torch.save({}, tmp_path / "bin-only" / "pytorch_model.bin")
    with pytest.raises(LoadError, match=r"neither model\.safetensors nor .*pytorch_model\.bin.*convert them"):
        _load(str(tmp_path / "bin-only"))


def test_options_that_place_or_fetch_weights_otherwise_are_refused(llama_dir, no_reads):
    for kwargs, words in (({"device_map": "auto"}, "device_map= (each rank holds its shards"),
                          ({"tp_plan": "auto"}, "tp_plan= (the tensor-parallel layout is tp_trainer's plan"),
                          ({"revision": "main"}, "revision= (tp_trainer.from_pretrained reads a local directory"),
                          ({"no_such_option": 1}, "got ['no_such_option']: neither fields of LlamaConfig")):
        with pytest.raises(LoadError, match=words.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
            _load(llama_dir, **kwargs)
    with pytest.raises(LoadError, match="tp_size=2 but context has tp_size=1"):
        from_pretrained(llama_dir, tp_size=2, context=ParallelContext.single())


def test_dtype_config_overrides_and_the_marker_follow_from_pretrained(llama_dir):
    """At tp=1 (nothing split) the model is transformers' own, bit for bit, with the same options applied."""
    mine = _load(llama_dir, dtype=torch.bfloat16, attn_implementation="eager", rms_norm_eps=1e-3)
    ref = T.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, attn_implementation="eager",
                                                 rms_norm_eps=1e-3)
    assert mine.config.rms_norm_eps == 1e-3 and mine.config._attn_implementation == "eager"
    assert mine.config.dtype == ref.config.dtype == torch.bfloat16
    ref_state = ref.state_dict()
    for name, t in mine.state_dict().items():
        assert t.dtype == ref_state[name].dtype and torch.equal(_bytes(t), _bytes(ref_state[name])), name
    assert mine.generation_config.to_dict() == ref.generation_config.to_dict()
    state = sharded_state(mine)
    assert state is not None and state.plan.tp_size == 1 and state.full_parameters == ref.num_parameters()
    assert sharded_state(ref) is None
    assert state.structure == [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    with pytest.raises(LoadError, match=r"loaded by tp_trainer.from_pretrained with tp_size=1 \(asked: tp_size=2\), "
                                        r"cpu_kernels='auto' \(asked: cpu_kernels='off'\): load it with the same"):
        sharded_state(mine, tp_size=2, cpu_kernels="off")
    assert sharded_state(mine, tp_size=1, use_cpu=state.context.device.type == "cpu", cpu_kernels="auto") is state


def test_a_checkpoint_holding_both_tied_tensors_is_tied_as_transformers_ties_it(tmp_path):
    """GPT-2 ties lm_head.weight to transformer.wte.weight. A checkpoint holding both: equal values stay tied (read
    once), different ones are untied (from_pretrained's rule, decided after its load; here before the plan)."""
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    for path, value in ((same, None), (other, 7.0)):
        tiny_model("gpt2").save_pretrained(path)
        _rewrite(path, lambda t, value=value: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()
                                                        if value is None
                                                        else torch.full_like(t["transformer.wte.weight"], value)}))
        mine, ref = _load(path), T.AutoModelForCausalLM.from_pretrained(path)
        tied = value is None
        assert (mine.lm_head.weight is mine.transformer.wte.weight) == tied
        assert (ref.lm_head.weight is ref.transformer.wte.weight) == tied
        assert mine.all_tied_weights_keys == ref.all_tied_weights_keys
        for name in ("lm_head.weight", "transformer.wte.weight"):
            assert torch.equal(mine.get_parameter(name), ref.get_parameter(name)), name
