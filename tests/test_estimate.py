"""``tp_trainer.memory`` / ``tp-trainer estimate``: the per-rank memory theory against live tensors.

The estimate never allocates (meta model, real planner, one simulated step); here real gloo
ranks build the same model, shard it, train two steps with a real ``ShardedOptimizer`` and the
CPU attention TPTrainer installs, and count

* the bytes of the live parameters, gradients and optimizer states after backward, with the
  function the benchmark uses: the estimate must equal them exactly (both count whole tensors
  of known shapes and dtypes, nothing is approximated);
* the peak of the second step: the live tensors at its start plus the most it allocates on top
  (``LiveTensorBytes``). The estimate simulates the same step on ``meta`` with the same code
  (TP layers on a simulated group, the same loss, attention kernel and ZeRO buffers), so it
  should be exact, and is in almost every run; the issue allows 10%. The bound below: the
  estimate may not exceed the measurement by more than 1% (ops whose output lifetime differs
  between meta and CPU kernels), and may fall short of it by 4%: a gloo collective's buffers
  live until the peer rank has finished it, so the measured peak can include one more ZeRO
  bucket, depending on timing (seen twice in about ten runs of this file, +2.3% in the
  gradient-dominated cases, where one bucket is that much of the peak). ZeRO now frees its
  buckets itself once their collective is done (``collectives.free_now``), after the bf16
  ZeRO-0 dp=2 case measured 17% over the estimate in 3 of 9 runs of this file (0 of 8 since). An unmodelled buffer
  of a layout (a ZeRO bucket on every step, a second copy of the logits) is 5-60% on these models.
  Buffers ``free_now`` empties while gloo still holds them count at their new size (0) since
  ``LiveTensorBytes`` reads resized storages; before, the bf16 ZeRO-0 dp=2 case measured 20% over
  the estimate in 4 of 14 runs of this file on one host (0 of 12 since).

ZeRO-3 (FSDP2 + ``FullyShardedOptimizer``) runs in a tp=2 x dp=2 world of its own, measured the same way
(``_fresh_gather_storages`` says what FSDP2's reused storages need for the tracker to see them).
"""

from __future__ import annotations

import json
import os
import math

import pytest
import torch
import transformers as T
from transformers import AutoConfig

from tests.distributed import run_distributed
from tests.models import tiny_model
from tp_trainer.commands import estimate as estimate_cmd
from tp_trainer.memory import estimate_memory
from tp_trainer.zero import bucket_shard_numel

# (family, tp, zero, dtype[, micro-batch, seq, bucket elements[, activation checkpointing[, sequence parallel]]])
# run in one 2-rank world; tp=1 means dp=2.
# The default batch makes activations the same order as these tiny models' states (the peak comes
# in forward/backward); the last three make gradients dominate: ZeRO-0's dp bucket and fp32 master
# gradients set the peak, and in many small buckets ZeRO-2's reduce-and-free during backward sets
# it apart from ZeRO-1's.
BATCH, SEQ, BUCKET = 2, 96, 2**24
CASES = [("llama", 2, 0, "fp32"), ("llama", 2, 1, "bf16"), ("llama", 2, 2, "fp32"), ("gpt2", 2, 0, "bf16"),
         ("gemma", 2, 1, "fp32"), ("llama", 1, 1, "bf16"), ("llama", 1, 2, "bf16"), ("llama", 1, 0, "bf16"),
         ("qwen3", 2, 2, "bf16"), ("llama", 1, 0, "fp32"), ("llama", 1, 0, "bf16", 1, 4, BUCKET),
         ("llama", 1, 1, "fp32", 1, 4, 2048), ("llama", 1, 2, "fp32", 1, 4, 2048),
         # activation checkpointing: each decoder layer keeps its input, recomputes its forward in backward
         ("llama", 2, 1, "bf16", BATCH, SEQ, BUCKET, True), ("gpt2", 2, 0, "fp32", BATCH, SEQ, BUCKET, True),
         # sequence parallelism (the first as the second case, then odd lengths: padded), with checkpointing
         ("llama", 2, 1, "bf16", BATCH, SEQ, BUCKET, False, True), ("gpt2", 2, 0, "bf16", BATCH, SEQ + 1, BUCKET, False, True),
         ("qwen3", 2, 2, "bf16", BATCH, SEQ + 1, BUCKET, True, True)]


MEASURED_ON_CPU = pytest.mark.cpu_only(
    reason="measures gloo ranks' CPU tensors (CPU attention kernel) against the estimate for device='cpu'")


def _layout(case):
    family, tp, zero, dtype, *rest = case
    batch, seq, bucket, checkpointing, sp = (*(rest or (BATCH, SEQ, BUCKET)), False, False)[:5]
    return family, tp, zero, dtype, batch, seq, bucket, checkpointing, sp


def _measure_cases(cases):
    from tp_trainer.memory import measure_training_memory
    from tp_trainer.parallel.attention import use_cpu_attention
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.zero import ShardedOptimizer

    out = []
    for family, tp, zero, dtype, batch, seq, bucket, checkpointing, sp in map(_layout, cases):
        model = tiny_model(family, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        ctx = ParallelContext.from_environment(tp)
        apply_tensor_parallel(model, plan_tensor_parallel(model, tp), ctx, sequence_parallel=sp)
        if ctx.kernels.cpu_attention:  # as TPTrainer does
            use_cpu_attention(model)
        if checkpointing:  # as TPTrainer's --activation_checkpointing (no KV cache while it recomputes)
            model.activation_checkpointing_enable()
            model.config.use_cache = False
        # the Trainer's default optimizer (adamw_torch_fused), which the estimate assumes: it steps in place
        opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), ctx, stage=zero,
                               bucket_numel=bucket)
        ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(ctx.dp_rank))
        at_start, states, peak = _second_step(model, opt, ids, measure_training_memory)
        out.append({"dp": ctx.dp_size, **states, "peak": peak})
    return out


def _second_step(model, opt, ids, states_of, before=lambda model: None):
    """One step to create the optimizer's states, then a second one measured: ``(live states at its start,
    states_of(model, opt) at its gradient peak, its peak: the start plus the most it allocates on top)``.
    ``before(model)`` runs between the start's count and the measured step."""
    from tp_trainer.memory_trace import LiveTensorBytes

    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # creates the Adam states
    opt.zero_grad()
    at_start = sum(states_of(model, opt).values())
    before(model)
    with LiveTensorBytes() as live:  # the second step, states present
        model(input_ids=ids, labels=ids).loss.backward()
        opt.finish_grad_sync()
        states = states_of(model, opt)  # the gradient peak
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
    return at_start, states, at_start + live.peak


@pytest.fixture(scope="module")
def measured():
    ranks = run_distributed(_measure_cases, 2, CASES)
    return [{**max(per_rank, key=lambda m: m["params"] + m["grads"] + m["optimizer"]),
             "peak": max(m["peak"] for m in per_rank)} for per_rank in zip(*ranks)]


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=["{}-tp{}-zero{}-{}-{}x{}-bucket{}-checkpointing{}-sp{}".format(*_layout(c)) for c in CASES])
@MEASURED_ON_CPU
def test_estimate_equals_live_tensor_bytes(measured, index):
    family, tp, zero, dtype, batch, seq, bucket, checkpointing, sp = _layout(CASES[index])
    got = measured[index]
    config = tiny_model(family).config  # dropout off, as in the measured model
    est = estimate_memory(config, tp=tp, dp=got["dp"], zero=zero, dtype=dtype, batch=batch, seq=seq, device="cpu",
                          bucket_numel=bucket, checkpointing=checkpointing, sequence_parallel=sp)
    assert (est.params, est.grads, est.optimizer) == (got["params"], got["grads"], got["optimizer"])
    ratio = est.peak / got["peak"]
    assert 0.96 <= ratio <= 1.01, \
        f"estimated peak {est.peak} vs measured {got['peak']} (ratio {ratio:.3f}, activations {est.activations})"
    if bucket == BUCKET:  # the step's own allocations are a real part of the check
        assert got["peak"] > 1.3 * est.persistent


@MEASURED_ON_CPU
def test_zero2_peak_is_below_zero1_when_gradients_dominate(measured):
    """The many-bucket cases above are a check of the ZeRO buffers only if the stages' peaks differ."""
    zero1, zero2 = (measured[CASES.index(("llama", 1, z, "fp32", 1, 4, 2048))] for z in (1, 2))
    assert zero2["peak"] < 0.95 * zero1["peak"], (zero1["peak"], zero2["peak"])


@MEASURED_ON_CPU
def test_sequence_parallelism_lowers_the_peak(measured):
    """The same layout with and without sequence parallelism: the norms, residual adds and the column layers'
    inputs keep a chunk of the tokens, and both the estimate and the live ranks see it. (Here the CPU
    attention kernel's saved probabilities, ``a s^2`` per sequence, are most of a tiny model's activations:
    with fused attention's, as on CUDA, the split part is the larger one.)"""
    plain, split = CASES.index(("llama", 2, 1, "bf16")), CASES.index(("llama", 2, 1, "bf16", BATCH, SEQ, BUCKET, False, True))
    assert measured[split]["peak"] < measured[plain]["peak"], (measured[split]["peak"], measured[plain]["peak"])
    config = tiny_model("llama").config
    estimates = [estimate_memory(config, tp=2, dp=1, zero=1, dtype="bf16", batch=BATCH, seq=SEQ, device="cuda",
                                 sequence_parallel=sp) for sp in (False, True)]
    assert estimates[1].activations < 0.8 * estimates[0].activations
    assert estimates[1].sequence_parallel and not estimates[0].sequence_parallel


def test_states_shrink_as_the_theory_says():
    """ZeRO-1/2 divide the optimizer by dp; tp divides the parameters of the sharded layers."""
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    base = estimate_memory(cfg, tp=1, dp=1, zero=0, dtype="bf16", batch=1, seq=16)
    tp2 = estimate_memory(cfg, tp=2, dp=1, zero=0, dtype="bf16", batch=1, seq=16)
    z1 = estimate_memory(cfg, tp=1, dp=4, zero=1, dtype="bf16", batch=1, seq=16)
    replicated = 2 * 2 * 256 + 256  # two RMSNorm weights per layer + the final norm: not split
    assert tp2.local_params == (base.total_params - replicated) // 2 + replicated
    assert z1.optimizer == 12 * bucket_shard_numel([base.local_params], 4)
    assert base.optimizer == 12 * base.local_params  # bf16: fp32 master (4) + two Adam states (8)
    assert tp2.activations < base.activations


def test_zero3_states_are_the_padded_dp_shards(tmp_path, capsys):
    """ZeRO-3 keeps 4 + 8 bytes per element of ceil(rows / dp) rows of every local TP tensor between steps (16 bytes
    with the gradient shards), whatever the training dtype; the CLI takes --zero 3 and refuses stage 4."""
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=98)
    z3 = estimate_memory(cfg, tp=2, dp=2, zero=3, dtype="bf16", batch=1, seq=16)
    z1 = estimate_memory(cfg, tp=2, dp=2, zero=1, dtype="bf16", batch=1, seq=16)
    shard = sum(math.ceil(p.shape[0] / 2) * math.prod(p.shape[1:]) for p in _tp_local_shapes(cfg, 2))
    assert shard > z3.local_params / 2  # 49 vocabulary rows per TP rank: 25 on dp rank 0
    assert (z3.params, z3.grads, z3.optimizer, z3.persistent) == (4 * shard, 4 * shard, 8 * shard, 12 * shard)
    assert z3.activations == z1.activations and z3.peak < z1.peak
    assert z3.step_peak > z3.activations + z3.grads  # plus the units gathered and the reduce-scatter buffer
    with pytest.raises(ValueError, match="zero must be 0, 1, 2 or 3, got 4"):
        estimate_memory(cfg, tp=2, dp=2, zero=4, dtype="bf16", batch=1, seq=16)
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    assert estimate_cmd.main(["--model", str(path), "--tp", "2", "--dp", "2", "--zero", "3", "--seq", "16",
                              "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak"] == z3.peak
    assert estimate_cmd.main(["--model", str(path), "--tp", "2", "--dp", "2", "--zero", "1", "--seq", "16",
                              "--compare"]) == 0
    assert "(zero=3: peak" in capsys.readouterr().out


def _tp_local_shapes(config, tp):
    from tp_trainer.memory import _sharded_meta_model

    return list(_sharded_meta_model(config, tp, torch.bfloat16).parameters())


def test_bucket_shards_round_up_per_bucket():
    assert bucket_shard_numel([3, 3, 3], 2, bucket_numel=6) == 3 + 2  # buckets [3,3] -> 3 each, [3] -> 2
    assert bucket_shard_numel([10], 4) == 3


def test_cli_prints_components_and_rejects_bad_layouts(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 96}))
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--dp", "2", "--zero", "1", "--batch", "2",
                              "--seq", "16", "--compare"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer states", "activations", "peak", "zero=0", "zero=2"):
        assert word in out
    assert "checkpointing" not in out
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--seq", "16", "--activation-checkpointing",
                              "--json"]) == 0
    recomputed = json.loads(capsys.readouterr().out)
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--seq", "16", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert recomputed["checkpointing"] and not kept["checkpointing"]
    assert recomputed["activations"] < kept["activations"] / 2  # each layer keeps its input only
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "3"]) == 1  # 4 heads cannot split over 3 ranks
    assert "tp=3" in capsys.readouterr().err
    assert estimate_cmd.main(["--model", str(cfg), "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--seq", "16", "--sequence-parallel", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert split["sequence_parallel"] and split["activations"] < kept["activations"]
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--fit", "80 parsecs"]) == 2
    assert "--fit takes a positive memory size such as 80GiB" in capsys.readouterr().err


def test_fit_finds_the_longest_sequence_and_largest_batch_under_a_budget(tmp_path, capsys):
    """A budget set to the estimated peak of one layout: the search must land on exactly that layout."""
    from tp_trainer.memory import fit_memory

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    layout = dict(tp=2, dp=2, zero=1, dtype="bf16", sequence_parallel=True)
    by_seq = estimate_memory(cfg, batch=2, seq=640, **layout).peak
    fit = fit_memory(cfg, by_seq, batch=2, seq=64, seq_step=64, **layout)
    assert fit.longest_seq == 640 and fit.at_longest_seq.peak == by_seq
    assert estimate_memory(cfg, batch=2, seq=640 + 64, **layout).peak > by_seq
    by_batch = estimate_memory(cfg, batch=5, seq=64, **layout).peak
    fit = fit_memory(cfg, by_batch, batch=1, seq=64, **layout)
    assert fit.largest_batch == 5 and fit.at_largest_batch.peak == by_batch
    nothing = fit_memory(cfg, fit.persistent, batch=1, seq=64, seq_step=64, **layout)  # the states alone fill it
    assert (nothing.longest_seq, nothing.largest_batch) == (0, 0)
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    assert estimate_cmd.main(["--model", str(path), "--tp", "2", "--dp", "2", "--zero", "1", "--sequence-parallel",
                              "--batch", "2", "--seq", "64", "--fit-step", "64", "--fit", f"{by_seq}B"]) == 0
    out = capsys.readouterr().out
    assert "sequence parallel" in out and "longest sequence at micro-batch 2    640 tokens" in out


# ------------------------------------------------------------------- activations per layer: the closed forms
# A Llama-shaped and a GPT-2 layer (GELU-tanh MLP, dropout masks on the residual branches, flash attention:
# attn_pdrop 0) large enough that no term is rounding; 16-bit; without the CPU kernels (--cpu_kernels off), i.e.
# SDPA (CPU flash), the closed forms' attention; the Llama layer with the lean activations (the default: lean
# RMSNorm and gated MLP) and without them (TP_TRAINER_LEAN_ACTIVATIONS=0: Hugging Face's own modules).
THEORY_MODELS = {
    "llama": lambda: T.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=512),
    "gpt2": lambda: T.GPT2Config(n_embd=256, n_layer=3, n_head=8, vocab_size=512, attn_pdrop=0.0,
                                 activation_function="gelu_pytorch_tanh"),
}
THEORY_SEQ, THEORY_BATCH = 256, 2
THEORY_CASES = [(name, tp, sp, lean) for name in THEORY_MODELS for tp in (2, 4) for sp in (False, True)
                for lean in ((True, False) if name == "llama" else (True,))]


def _saved_bytes_of_a_layer(name: str, tp: int, sp: bool, lean: bool) -> int:
    """Bytes one decoder layer saves for backward on this rank: every distinct storage autograd packs while the
    middle layer runs forward (the first one also packs the rotary tables all layers share), parameters aside."""
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel

    os.environ["TP_TRAINER_LEAN_ACTIVATIONS"] = "1" if lean else "0"
    try:
        ctx = ParallelContext.from_environment(tp, cpu_kernels="off")
    finally:
        del os.environ["TP_TRAINER_LEAN_ACTIVATIONS"]
    assert ctx.kernels.lean_activations is lean
    cfg = THEORY_MODELS[name]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    apply_tensor_parallel(model, plan_tensor_parallel(model, tp), ctx, sequence_parallel=sp)
    layer = (model.model.layers if name == "llama" else model.transformer.h)[1]
    inside = [False]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set = set()
    total = [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in params:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes() if inside[0] else 0
        return t

    ids = torch.randint(0, cfg.vocab_size, (THEORY_BATCH, THEORY_SEQ), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total[0]


def _theory_world():
    return {case: _saved_bytes_of_a_layer(*case) for case in THEORY_CASES}  # tp=2 runs as tp 2 x dp 2


@pytest.fixture(scope="module")
def saved_per_layer():
    return run_distributed(_theory_world, 4)


@pytest.mark.parametrize("case", THEORY_CASES, ids=["{}-tp{}-sp{}-lean{}".format(*c) for c in THEORY_CASES])
@pytest.mark.cpu_only(reason="the closed forms' CPU variant: 16-bit dropout masks and LayerNorm statistics")
def test_activations_per_layer_are_the_closed_form(saved_per_layer, case):
    """Korthikanti et al.'s count (GPT) and the same count for a Llama-shaped layer (memory_theory.py) against
    what a live rank's layer keeps. The issue's bound is 10%; the count is derived from the tensors the code
    keeps and was measured equal to the byte, so a drift means the modeling code or a kernel changed."""
    from tp_trainer.memory_theory import layer_activation_bytes

    name, tp, sp, lean = case
    want = layer_activation_bytes(THEORY_MODELS[name](), seq=THEORY_SEQ, batch=THEORY_BATCH, tp=tp,
                                  sequence_parallel=sp, device="cpu", lean=lean)
    for rank in saved_per_layer:
        assert abs(rank[case] / want - 1) <= 0.10, f"{case}: measured {rank[case]} bytes, the closed form {want}"
    if sp:  # sequence parallelism keeps a tp-th of what the layer keeps whole without it
        assert saved_per_layer[0][case] < saved_per_layer[0][(name, tp, False, lean)]
    if not lean:  # the lean modules keep less than Hugging Face's own
        assert saved_per_layer[0][(name, tp, sp, True)] < saved_per_layer[0][case]


# ------------------------------------------------------------------- ZeRO-3 (FSDP2 per unit) against live ranks
# tp=2 x dp=2 in one 4-rank world: an untied model (the embeddings are units of their own), in fp32 and bf16
# (fp32 masters, 16-bit compute), a tied one (the root holds the shared embedding for the whole step), and
# 4 tokens, where the gathered units and the gradient buffers of backward set the peak, not the activations
# (the estimate with one unit in flight in backward, without FSDP2's prefetch, is 1% low there); with activation
# checkpointing (a block recomputed in backward while it is gathered).
ZERO3_CASES = [("llama", "fp32", BATCH, SEQ, False), ("llama", "bf16", BATCH, SEQ, False),
               ("gpt2", "bf16", BATCH, SEQ, False), ("llama", "bf16", 1, 4, False), ("llama", "bf16", BATCH, SEQ, True)]


def _measure_zero3(cases):
    from tp_trainer.parallel.attention import use_cpu_attention
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.zero import FullyShardedOptimizer, shard_parameters_over_dp

    def live_states(model, opt):  # each storage once: fp32 shards, their gradients, AdamW's states
        from tp_trainer.memory import _storage_bytes

        seen: set = set()
        params = _storage_bytes(model.parameters(), seen)
        grads = _storage_bytes([p.grad for p in model.parameters()], seen)
        states = [t for s in opt.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        return {"params": params, "grads": grads, "optimizer": _storage_bytes(states, seen)}

    out = []
    for family, dtype, batch, seq, checkpointing in cases:
        model = tiny_model(family, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        ctx = ParallelContext.from_environment(2)
        apply_tensor_parallel(model, plan_tensor_parallel(model, 2), ctx)
        if ctx.kernels.cpu_attention:  # as TPTrainer does
            use_cpu_attention(model)
        if checkpointing:
            model.activation_checkpointing_enable()
            model.config.use_cache = False
        model = shard_parameters_over_dp(model, ctx)
        opt = FullyShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), ctx)
        ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(ctx.dp_rank))
        at_start, states, peak = _second_step(model, opt, ids, live_states, before=_fresh_gather_storages)
        out.append({"dp": ctx.dp_size, **states, "at_start": at_start, "peak": peak,
                    "loss": model(input_ids=ids, labels=ids).loss.item()})
    return out


def _fresh_gather_storages(model):
    """Make FSDP2 allocate its unsharded parameters anew in the next step, where ``LiveTensorBytes`` sees them.

    FSDP2 keeps each parameter's all-gather output from step to step and frees / re-allocates it by resizing
    its storage in place (``UntypedStorage.resize_``, not an op the dispatcher sees): made in the first step,
    the gathered units of the second would be invisible to the tracker (a 2-7% lower measured peak on these
    models, where the gathered root or a block is that much of it). Dropping them (and the parameter that
    views them) between steps makes the next all-gather create them with ``torch.empty``, which is seen, and
    every later resize of a storage created in the mode is counted at its new size."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            fsdp_param.all_gather_outputs = []
            del fsdp_param._unsharded_param


@pytest.fixture(scope="module")
def measured_zero3():
    return run_distributed(_measure_zero3, 4, ZERO3_CASES)


@pytest.mark.parametrize("index", range(len(ZERO3_CASES)), ids=["{}-{}-{}x{}-checkpointing{}".format(*c) for c in ZERO3_CASES])
@MEASURED_ON_CPU
def test_zero3_estimate_equals_live_ranks(measured_zero3, index):
    """Stage 3: the states exactly (rank 0 holds ceil(rows / dp) rows of every local TP tensor, the largest shard);
    the peak on the largest rank within the other stages' bound (module docstring). Measured 0.9991-1.0004 in 7 of
    8 runs of these cases, the same to the byte each time; once, on a loaded host, the tied GPT-2 case measured
    2.7% over the estimate (0.974): a collective's buffer gloo held until its peer finished, as the module
    docstring describes for ZeRO buckets. Buffers the estimate once left out: the forward's kept all-gather
    output (-2.6% fp32, -1.4% bf16 before it was modelled), the prefetched unit of backward (-1.03% at 4 tokens)."""
    family, dtype, batch, seq, checkpointing = ZERO3_CASES[index]
    ranks = [per_rank[index] for per_rank in measured_zero3]
    got = max(ranks, key=lambda m: m["params"] + m["grads"] + m["optimizer"])
    est = estimate_memory(tiny_model(family).config, tp=2, dp=got["dp"], zero=3, dtype=dtype, batch=batch, seq=seq,
                          device="cpu", checkpointing=checkpointing)
    assert (est.params, est.grads, est.optimizer) == (got["params"], got["grads"], got["optimizer"])
    assert est.persistent == got["at_start"]  # the gradient shards are gone after zero_grad
    peak = max(m["peak"] for m in ranks)
    ratio = est.peak / peak
    assert 0.96 <= ratio <= 1.01, f"estimated peak {est.peak} vs measured {peak} (ratio {ratio:.4f}, " \
                                  f"persistent {est.persistent}, activations {est.activations})"
    assert peak > 1.3 * est.persistent  # the step's own allocations are a real part of the check
    assert all(math.isfinite(m["loss"]) for m in ranks)  # it still trains after _fresh_gather_storages
