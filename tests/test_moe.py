"""MoE decoders: tensor parallelism inside every expert trains exactly like the unsharded model.

Families (transformers 5 fused 3-D experts): Mixtral, Qwen2-MoE (with a shared expert and its
gate), Qwen3-MoE, OLMoE, plus a MoE whose experts are a ``ModuleList`` of MLPs (older/remote-code
layout). Each: 4 experts, top-2 routing, the load-balancing loss in the loss. At tp=2 (and Mixtral
at tp=4: 12 intermediate units per expert per rank, KV heads replicated), 5 AdamW steps against
the same function at tp=1 in this process: per-step losses, per-step global gradient norms and
the first step's gradients gathered to full tensors. Also: the router's gradient is the same on
every rank, per-rank parameter counts equal the theory, and the plan shards the experts without
a replication warning.

Tolerance (as tests/test_families.py): fp32, identical inputs; TP only reorders sums (the partial
expert outputs of the intermediate units, the row-parallel layers, the vocab-parallel loss).
Differences are ~1e-7 per step, below 1e-5 after 5 Adam steps, so 2e-5 absolute on O(1) losses
and gradients separates reordering from a real bug (a wrong shard, a missing f on the routing
weights or a missing g moves them by >1e-2). The top-2 choice itself is discrete: a reordering
that flipped a near-tie would move a loss by far more than 2e-5, and does not happen here.
Gradient norms are compared relatively at 1e-4.
"""

import pytest
import torch
import torch.nn as nn
import transformers as T
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from distributed import run_distributed
from models import MOE_FAMILIES
from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
from tp_trainer.parallel.experts import shard_experts
from tp_trainer.parallel.gather import iter_full_state
from tp_trainer.planner import Style
from tp_trainer.planner.experts import ExpertsLayout, fused_experts_layout
from tp_trainer.zero import ShardedOptimizer

TOL = 2e-5
NORM_RTOL = 1e-4
STEPS = 5
ROUTER = ".mlp.gate.weight"


# ------------------------------------------------------------------------------------ models
class ListExpert(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ListMoeBlock(nn.Module):
    """The pre-transformers-5 layout: a router and a ModuleList of expert MLPs, looped over."""

    def __init__(self, config):
        super().__init__()
        self.gate = MixtralTopKRouter(config)  # recorded by Mixtral's output capture: the aux loss sees it
        self.experts = nn.ModuleList(ListExpert(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.num_local_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.where(index == e)
            if tokens.numel():
                out = out.index_add(0, tokens, expert(x[tokens]) * weights[tokens, slot, None])
        return out.reshape(shape)


def tiny_moe(family: str, seed: int = 0):
    """A tiny MoE model (same weights for the same seed); ``list_experts``: Mixtral with ModuleList experts."""
    cfg = MOE_FAMILIES["mixtral" if family == "list_experts" else family]()
    for key, value in list(vars(cfg).items()):  # exact forwards: no dropout
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(cfg, key, 0.0)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg)
    if family == "list_experts":  # initialised as transformers initialises the fused experts and the router
        for layer in model.model.layers:
            layer.mlp = ListMoeBlock(cfg)
            for p in layer.mlp.parameters():
                nn.init.normal_(p, std=cfg.initializer_range)
    return model


# ---------------------------------------------------------------------------- the runs
def train_steps(family, tp):
    ctx = ParallelContext.from_environment(tp)
    model = tiny_moe(family).to(ctx.device)  # the test device (tests/distributed.py): CPU or the rank's GPU
    plan = plan_tensor_parallel(model, tp)
    apply_tensor_parallel(model, plan, ctx)
    local_counts = {n: p.numel() for n, p in model.named_parameters()}
    opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx, stage=0)
    batches = torch.randint(0, 96, (STEPS, 4, 16), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    losses, aux, norms, grads, router = [], [], [], None, None
    for step in range(STEPS):
        out = model(input_ids=batches[step], labels=batches[step])
        out.loss.backward()
        opt.finish_grad_sync()
        if step == 0:
            router = {n: p.grad.cpu().clone() for n, p in model.named_parameters() if n.endswith(ROUTER)}
            grads = {name: g.cpu().clone() for name, g in iter_full_state(model, ctx.tp_group, grads=True)}
        norms.append(opt.clip_grad_norm(1.0).item())
        opt.step()
        model.zero_grad()
        losses.append(out.loss.item())
        aux.append(out.aux_loss.item())
    return {"losses": losses, "aux": aux, "norms": norms, "grads": grads, "router": router,
            "local_counts": local_counts}


TP2_CASES = sorted(MOE_FAMILIES) + ["list_experts"]
TP4_CASES = ["mixtral"]


def moe_suite(tp, families):
    return {family: train_steps(family, tp) for family in families}


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(moe_suite, 2, 2, TP2_CASES)


@pytest.fixture(scope="module")
def tp4():
    return run_distributed(moe_suite, 4, 4, TP4_CASES)


@pytest.fixture(scope="module")
def references():
    return {}


def _reference(references, family):
    if family not in references:
        references[family] = train_steps(family, 1)
    return references[family]


def _assert_matches_unsharded(ranks, family, references):
    ref = _reference(references, family)
    assert ref["aux"][0] > 0.5, "the load-balancing loss is part of the loss"  # E * sum(f_i P_i) >= top_k / 2 here
    for got in (r[family] for r in ranks):
        assert got["losses"] == pytest.approx(ref["losses"], abs=TOL), "per-step losses"
        assert got["aux"] == pytest.approx(ref["aux"], abs=TOL), "per-step load-balancing losses"
        assert got["norms"] == pytest.approx(ref["norms"], rel=NORM_RTOL), "per-step global gradient norms"
        assert got["grads"].keys() == ref["grads"].keys()
        for param, g in ref["grads"].items():
            diff = (got["grads"][param] - g).abs().max().item()
            assert diff < TOL, f"{family}: gradient of {param} differs by {diff}"


@pytest.mark.parametrize("family", TP2_CASES)
def test_tp2_matches_unsharded(tp2, references, family):
    _assert_matches_unsharded(tp2, family, references)


@pytest.mark.parametrize("family", TP4_CASES)
def test_tp4_matches_unsharded(tp4, references, family):
    _assert_matches_unsharded(tp4, family, references)


@pytest.mark.parametrize("family", TP2_CASES)
def test_router_gradients_are_identical_on_every_rank(tp2, tp4, family):
    worlds = [tp2] + ([tp4] if family in TP4_CASES else [])
    for ranks in worlds:
        first = ranks[0][family]["router"]
        assert len(first) == 2  # one router per layer, replicated (full gradient on every rank)
        for other in ranks[1:]:
            for name, g in first.items():
                assert torch.equal(other[family]["router"][name], g), f"{name} differs between ranks"


def _theory(family, tp):
    """Per-rank parameter elements from the plan: the experts' projections and every other sharded tensor
    1/tp (a fused block replicated on r ranks r/tp), row-parallel biases and replicated tensors whole."""
    model = tiny_moe(family)
    plan = plan_tensor_parallel(model, tp)
    modules = dict(model.named_modules())
    total, experts, seen = 0, 0, set()
    for name, entry in plan.entries.items():
        for pname, p in modules[name].named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight is one tensor
                continue
            seen.add(id(p))
            n = p.numel()
            if entry.style == Style.EXPERTS:
                experts += n // tp
                total += n // tp
            elif entry.style in (Style.REPLICATED, Style.REPLICATED_GRAD_SUM) or (
                    entry.style == Style.ROWWISE and pname == "bias"):
                total += n
            elif entry.blocks:
                size = sum(s for s, _ in entry.blocks)
                total += n * sum(s * r for s, r in entry.blocks) // (size * tp)
            else:
                total += n // tp
    return total, experts


@pytest.mark.parametrize("family", TP2_CASES)
def test_per_rank_parameter_counts_equal_the_theory(tp2, tp4, family):
    cfg = MOE_FAMILIES["mixtral" if family == "list_experts" else family]()
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    for tp, ranks in [(2, tp2)] + ([(4, tp4)] if family in TP4_CASES else []):
        total, _ = _theory(family, tp)
        # closed form of the experts alone: E experts x (gate + up + down) x H x I / tp, per layer
        closed = cfg.num_hidden_layers * experts * 3 * cfg.hidden_size * inter // tp
        for rank in ranks:
            counts = rank[family]["local_counts"]
            assert sum(counts.values()) == total
            held = sum(n for name, n in counts.items() if ".mlp.experts." in name)
            assert held == closed, f"tp={tp}: experts hold {held} elements per rank, theory {closed}"


# ------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_plan_shards_the_experts_without_a_replication_warning(family):
    model = tiny_moe(family)
    for tp in (2, 4):
        plan = plan_tensor_parallel(model, tp)
        styles = {n: e.style for n, e in plan.entries.items() if n.endswith(".mlp.experts")}
        assert len(styles) == 2 and set(styles.values()) == {Style.EXPERTS}
        assert all(plan.entries[n].style == Style.REPLICATED for n in plan.entries if n.endswith(".mlp.gate"))
        assert not [w for w in plan.warnings if "expert" in w.lower()], plan.warnings
        assert plan.sharded_fraction() > 0.98
        assert any(n.startswith("checked: one training step") for n in plan.notes), plan.notes
    if family == "qwen2_moe":  # the shared expert is an ordinary MLP, its gate (1 output) replicated
        e = plan.entries
        assert e["model.layers.0.mlp.shared_expert.gate_proj"].style == Style.COLWISE
        assert e["model.layers.0.mlp.shared_expert.down_proj"].style == Style.ROWWISE
        assert e["model.layers.0.mlp.shared_expert_gate"].style == Style.REPLICATED


def test_module_list_experts_are_planned_per_expert():
    plan = plan_tensor_parallel(tiny_moe("list_experts"), 2)
    for layer in (0, 1):
        for e in range(4):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            assert plan.entries[prefix + "gate_proj"].style == Style.COLWISE
            assert plan.entries[prefix + "up_proj"].style == Style.COLWISE
            assert plan.entries[prefix + "down_proj"].style == Style.ROWWISE
    assert not [w for w in plan.warnings if "expert" in w.lower()], plan.warnings


def test_experts_it_cannot_shard_stay_replicated_with_the_warning_and_the_reason():
    cfg = MOE_FAMILIES["mixtral"]()
    cfg.intermediate_size = 50  # not divisible by 4
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    plan = plan_tensor_parallel(model, 4)
    assert plan.entries["model.layers.0.mlp.experts"].style == Style.REPLICATED
    assert any("MoE experts" in w and "model.layers.*.mlp.experts" in w for w in plan.warnings)
    assert any("intermediate width 50 is not divisible by tp_size=4" in n for n in plan.notes)
    assert plan_tensor_parallel(model, 2).entries["model.layers.0.mlp.experts"].style == Style.EXPERTS


def test_a_user_plan_can_keep_the_experts_replicated():
    plan = plan_tensor_parallel(tiny_moe("mixtral"), 2, user_plan={"model.layers.*.mlp.experts": "replicated"})
    assert plan.entries["model.layers.0.mlp.experts"].style == Style.REPLICATED
    assert any("MoE experts" in w for w in plan.warnings)


# ------------------------------------------------- layouts, one process: shards summed == the full module
class _Ctx:
    """A context without a group: f and g are identities, so rank r's module returns its partial output."""

    def __init__(self, rank, size):
        self.tp_rank, self.tp_size, self.tp_group, self.tp_comm = rank, size, None, None


def _experts_modules():
    llama4 = T.Llama4TextConfig(hidden_size=64, intermediate_size=48, num_local_experts=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=96)
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    mods = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        cfg = MOE_FAMILIES["mixtral"]()
        cfg._experts_implementation = impl
        mods[f"mixtral/{impl}"] = (MixtralExperts(cfg), "routed")
    mods["llama4 (transposed [E, H, 2I], undecorated)"] = (Llama4TextExperts(llama4), "dense")
    for mod, _ in mods.values():
        for p in mod.parameters():
            nn.init.normal_(p, std=0.1)
    return mods


def _run_experts(mod, kind, x, idx, w):
    """Output, input gradient and routing-weight gradient of an experts module under a fixed linear loss."""
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = mod(xi, idx, wi) if kind == "routed" else mod(xi)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), xi.grad, (wi.grad if kind == "routed" else None)


@pytest.mark.parametrize("tp", [2, 4])
def test_layouts_partial_outputs_and_gradients_sum_to_the_full_module(tp):
    """Every transformers experts implementation (eager, batched_mm, grouped_mm) and a transposed,
    undecorated layout (Llama-4) on each rank's shards: the partial outputs, input and routing-weight
    gradients sum to the full module's, and the weight-gradient shards reassemble to its gradients.
    fp32 (CPU grouped_mm has no fp64 kernel): sums of <= 64 products of O(0.1) values agree to ~1e-7,
    1e-5 is far below a misplaced shard (O(1e-2))."""
    import copy

    for label, (full, kind) in _experts_modules().items():
        layout = fused_experts_layout(full, tp)
        assert isinstance(layout, ExpertsLayout), f"{label}: {layout}"
        n, k, e = 10, 2, full.num_experts
        x = torch.randn(n if kind == "routed" else e * n, 64, dtype=torch.float32)
        idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
        w = torch.rand(n, k, dtype=torch.float32)

        y, dx, dw = _run_experts(full, kind, x, idx, w)
        parts = []
        for r in range(tp):
            local = shard_experts(copy.deepcopy(full), layout, _Ctx(r, tp))
            parts.append((_run_experts(local, kind, x, idx, w), local))
        assert torch.allclose(sum(p[0][0] for p in parts), y, atol=1e-5), f"{label}: output"
        assert torch.allclose(sum(p[0][1] for p in parts), dx, atol=1e-5), f"{label}: input gradient"
        if dw is not None:
            assert torch.allclose(sum(p[0][2] for p in parts), dw, atol=1e-5), f"{label}: routing-weight gradient"
        for pname, p in full.named_parameters():  # the shards' weight gradients are the full one's, cut
            locals_ = [getattr(m, pname) for _, m in parts]
            full_grad = locals_[0].tp_spec.unshard([t.grad for t in locals_])
            assert torch.allclose(full_grad, p.grad, atol=1e-5), f"{label}: gradient of {pname}"
            p.grad = None
