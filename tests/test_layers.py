"""TP layers and mappings against their dense counterparts on 2 ranks: outputs, input gradients, weight gradients.

On the CPU every check runs twice: with the TP all-reduces on the shared-memory transport (what
ParallelContext picks for gloo ranks on one host) and on gloo itself (the fallback across hosts).
Under ``TP_TRAINER_TEST_DEVICE=cuda`` it runs once, on NCCL, every tensor on the rank's GPU.

Tolerance: fp32 with the same inputs; the only difference is summation order (a row-parallel
product sums two partial dot products, the vocab-parallel loss two partial exp-sums), which
moves results by a few ulps: atol 1e-5 on O(1) values.
"""

import contextlib
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import TEST_BACKEND, run_distributed
from tp_trainer.parallel import mappings
from tp_trainer.parallel.collectives import TPComm
from tp_trainer.parallel.context import ParallelContext
from tp_trainer.parallel.cross_entropy import vocab_parallel_cross_entropy
from tp_trainer.parallel.gather import gather_full
from tp_trainer.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tp_trainer.parallel.sharding import contiguous_spec

ATOL = 1e-5
AUTOCAST_RTOL = 1e-2  # a missing or doubled rank's partial moves dx by ~50% relative


class Conv1D(nn.Module):  # GPT-2's layout: weight [in, out]
    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _diff(a, b):
    return (a - b).abs().max().item()


def _spec(ctx, pad=False):
    return lambda shape, dim: contiguous_spec(shape, dim, ctx.tp_rank, ctx.tp_size, pad_to_multiple=pad)


def _compiled(fn):
    """``fn`` through Dynamo and AOTAutograd as one graph (``fullgraph``: a graph break is an error),
    the TP collectives as custom operators in the forward and backward graphs. ``aot_eager`` skips
    Inductor's code generation (seconds per graph); tests/test_trainer.py compiles with Inductor."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _mlp_case(ctx, up, down, x, compiled=False):
    """dense ``down(gelu(up(x)))`` vs column(up) -> row(down): max diffs of output and gradients."""
    xd = x.clone().requires_grad_(True)
    y_ref = down(F.gelu(up(xd)))
    y_ref.square().sum().backward()
    col = ColumnParallelLinear.from_module(up, _spec(ctx), ctx.tp_comm)
    row = RowParallelLinear.from_module(down, _spec(ctx), ctx.tp_comm)
    xt = x.clone().requires_grad_(True)
    mlp = (lambda a: row(F.gelu(col(a))))
    y = (_compiled(mlp) if compiled else mlp)(xt)
    y.square().sum().backward()
    up_grad = gather_full(col.weight.grad, col.weight.tp_spec, ctx.tp_group)
    return {"y": _diff(y, y_ref), "dx": _diff(xt.grad, xd.grad), "dW_up": _diff(up_grad, up.weight.grad),
            "db_up": _diff(gather_full(col.bias.grad, col.bias.tp_spec, ctx.tp_group), up.bias.grad),
            "db_down": _diff(row.bias.grad, down.bias.grad)}


def _qkv_case(ctx, x, use=("q", "k", "v"), autocast=False, compiled=False, all_reduces=None):
    """q/k/v column-parallel layers reading one activation ``h = 2 x`` that a replicated path also
    reads (the residual stream): ``loss = sum over used outputs of (out * u)^2 + sum(h * r)``. The
    layers share one ``f`` node (``mappings.copy_to_tp_region_once``): their input gradients are
    summed locally and all-reduced once.
    ``all_reduces``: a list that receives the shapes of the out-of-place all-reduces of the TP run."""
    torch.manual_seed(1)
    mods = {"q": nn.Linear(8, 8), "k": nn.Linear(8, 4), "v": nn.Linear(8, 4, bias=False)}
    up = {n: torch.randn(3, 5, m.out_features) for n, m in mods.items()}
    r = torch.randn(3, 5, 8)
    tp_mods = {n: ColumnParallelLinear.from_module(m, _spec(ctx), ctx.tp_comm) for n, m in mods.items()}
    tp_up = {n: u.chunk(2, -1)[ctx.tp_rank] for n, u in up.items()}

    def loss(layers, upstream, a):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
            h = a * 2
            outs = {n: layers[n](h) for n in ("q", "k", "v")}  # every layer runs; only `use` reach the loss
            return sum(((outs[n].float() * upstream[n]) ** 2).sum() for n in use) + (h.float() * r).sum()

    xd, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss(mods, up, xd).backward()
    with _counting_all_reduces() as reduces:
        (_compiled(loss) if compiled else loss)(tp_mods, tp_up, xt).backward()
    if all_reduces is not None:
        all_reduces.extend(reduces)
    diff = _rel_diff if autocast else _diff
    diffs = {"dx": diff(xt.grad, xd.grad)}
    for n in use:
        diffs[f"dW_{n}"] = diff(gather_full(tp_mods[n].weight.grad, tp_mods[n].weight.tp_spec, ctx.tp_group),
                                mods[n].weight.grad)
    return diffs


@contextlib.contextmanager
def _counting_all_reduces():
    """Lists the out-of-place TP all-reduces issued inside the block (eager calls and compiled graphs'
    custom operators all end in ``TPComm.all_reduced_copy``)."""
    calls, inner = [], TPComm.all_reduced_copy

    def counted(comm, tensor):
        calls.append(tuple(tensor.shape))
        return inner(comm, tensor)

    TPComm.all_reduced_copy = counted
    try:
        yield calls
    finally:
        TPComm.all_reduced_copy = inner


def _rel_diff(a, b):
    return _diff(a, b) / b.abs().max().item()


def _shared_input_cases(ctx):
    x = torch.randn(3, 5, 8)
    out = {"shared_input_all_reduces": [], "shared_input_compiled_all_reduces": []}
    out["shared_input"] = _qkv_case(ctx, x, all_reduces=out["shared_input_all_reduces"])
    # k's output gets no gradient: the shared f node sums what q and v send
    out["shared_input_unused_output"] = _qkv_case(ctx, x, use=("q", "v"))
    # bf16 autocast (Trainer --bf16 on fp32 weights) vs the dense layers under the same autocast:
    # both compute in bf16 and TP splits the output columns, so dx differs by bf16 rounding of the
    # partial products (2^-8 relative each): relative diffs, measured 2e-3, checked at AUTOCAST_RTOL.
    out["shared_input_autocast_bf16"] = _qkv_case(ctx, x, autocast=True)
    out["shared_input_compiled"] = _qkv_case(ctx, x, compiled=True,
                                             all_reduces=out["shared_input_compiled_all_reduces"])
    # An unused sibling and no replicated reader of the input: its gradient is the used layer's alone
    lin = nn.Linear(8, 4)
    col = ColumnParallelLinear.from_module(lin, _spec(ctx), ctx.tp_comm)
    xd, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (lin(xd * 2) * 3).sum().backward()
    h = xt * 2
    used, unused = col(h), col(h)  # noqa: F841
    (used * 3).sum().backward()
    out["shared_input_one_output_used"] = {"dx": _diff(xt.grad, xd.grad)}
    return out


def _cross_entropy_cases(ctx):
    """vocab_parallel_cross_entropy on hand-split logits vs F.cross_entropy on the full ones."""
    out = {}
    torch.manual_seed(3)
    target = torch.tensor([0, 2, 1, -100, 2, 1])

    def split_loss(z, width, dtype=torch.float32):
        # rank r holds columns [r * width, (r + 1) * width), zero-padded past the vocabulary
        padded = F.pad(z, (0, 2 * width - z.shape[-1]))
        local = padded[:, ctx.tp_rank * width:(ctx.tp_rank + 1) * width].to(dtype).clone().requires_grad_(True)
        valid = max(0, min(width, z.shape[-1] - ctx.tp_rank * width))
        loss = vocab_parallel_cross_entropy(local, target, vocab_start=ctx.tp_rank * width, vocab_valid=valid,
                                            group=ctx.tp_comm)
        loss.backward()
        return loss, local

    def reference(z, width):
        zd = z.clone().requires_grad_(True)
        loss = F.cross_entropy(zd, target)
        loss.backward()
        grad = F.pad(zd.grad, (0, 2 * width - z.shape[-1]))[:, ctx.tp_rank * width:(ctx.tp_rank + 1) * width]
        return loss, grad

    # vocab 3 as 2 + 2 columns, and as 4 + 4 (rank 1's slice is all padding: no probability mass)
    # with logits spread over +-60 (exp would overflow fp32 without the max shift)
    z = torch.randn(6, 3) * 30
    for width, case in ((2, "ce_padded_column"), (4, "ce_rank_without_vocab")):
        loss_ref, grad_ref = reference(z, width)
        loss, local = split_loss(z, width)
        out[case] = {"loss": abs(loss.item() - loss_ref.item()), "dz": _diff(local.grad, grad_ref)}
    # bf16 logits: the math runs in fp32 on the same (bf16-rounded) values; the gradient comes back
    # in bf16, so it carries bf16 rounding (relative 2**-8) of values below 1
    zb = torch.randn(6, 3).bfloat16().float()
    loss_ref, grad_ref = reference(zb, 2)
    loss, local = split_loss(zb, 2, torch.bfloat16)
    out["ce_bf16_logits"] = {"loss": abs(loss.item() - loss_ref.item()), "dz": _diff(local.grad.float(), grad_ref),
                             "dtype": str(local.grad.dtype)}
    # the saved softmax becomes the gradient in place: a second backward must refuse, not go wrong
    local = z[:, :2].clone().requires_grad_(True) if ctx.tp_rank == 0 else F.pad(z[:, 2:], (0, 1)).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, vocab_start=2 * ctx.tp_rank, vocab_valid=2 - ctx.tp_rank,
                                        group=ctx.tp_comm)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
        out["ce_second_backward_error"] = ""
    except RuntimeError as err:
        out["ce_second_backward_error"] = str(err)
    return out


def _mappings_case(ctx, compiled=False):
    """Every wrapper of mappings.py against its definition, forward and backward, in one function (one
    graph when compiled). Rank ``r``'s inputs and upstream gradients are seeded by ``r``, so each rank
    computes every rank's: the expected values are sums of two fp32 numbers, in rank order, as the
    transports add them, and must match exactly (``ATOL`` allows the last ulp anyway)."""
    group, rank, tp = ctx.tp_comm, ctx.tp_rank, ctx.tp_size

    def seeded(seed, *shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(ctx.device)

    def ranks(seed, *shape):  # the tensor every rank r holds
        return [seeded(1000 * seed + r, *shape) for r in range(tp)]

    def rows(t):
        return t.chunk(tp, 0)[rank]

    def cols(t):
        return t.chunk(tp, -1)[rank]

    # name -> (wrapper, input on every rank, upstream gradient on every rank, expected out, expected grad)
    cases = {}
    x, u = ranks(1, 4, 6)[0], ranks(2, 4, 6)
    cases["copy_to_tp_region"] = (mappings.copy_to_tp_region, x, u[rank], x, sum(u))
    xs, u = ranks(3, 4, 6), ranks(4, 4, 6)[0]
    cases["reduce_from_tp_region"] = (mappings.reduce_from_tp_region, xs[rank], u, sum(xs), u)
    xs, u = ranks(5, 4, 6), ranks(6, 4, 6 * tp)[0]
    cases["gather_from_tp_region"] = (mappings.gather_from_tp_region, xs[rank], u, torch.cat(xs, -1), cols(u))
    x, u = ranks(7, 4, 6 * tp)[0], ranks(8, 4, 6)
    cases["scatter_to_tp_region"] = (mappings.scatter_to_tp_region, x, u[rank], cols(x), torch.cat(u, -1))
    x, u = ranks(9, 4 * tp, 6)[0], ranks(10, 4, 6)
    cases["scatter_to_sequence_parallel_region"] = (mappings.scatter_to_sequence_parallel_region, x, u[rank], rows(x),
                                                    torch.cat(u, 0))
    xs, u = ranks(11, 4, 6), ranks(12, 4 * tp, 6)
    cases["gather_from_sequence_parallel_region"] = (mappings.gather_from_sequence_parallel_region, xs[rank], u[rank],
                                                     torch.cat(xs, 0), rows(sum(u)))
    xs, u = ranks(13, 4, 6), ranks(14, 4 * tp, 6)[0]
    replicated = functools.partial(mappings.gather_from_sequence_parallel_region, replicated_grad=True)
    cases["gather_from_sequence_parallel_region_replicated_grad"] = (replicated, xs[rank], u, torch.cat(xs, 0), rows(u))
    xs, u = ranks(15, 4 * tp, 6), ranks(16, 4, 6)
    cases["reduce_scatter_to_sequence_parallel_region"] = (mappings.reduce_scatter_to_sequence_parallel_region,
                                                           xs[rank], u[rank], rows(sum(xs)), torch.cat(u, 0))

    def run(inputs):
        return [fn(a, group) for (fn, *_), a in zip(cases.values(), inputs)]

    inputs = [c[1].clone().requires_grad_(True) for c in cases.values()]
    outs = (_compiled(run) if compiled else run)(inputs)
    sum((o * c[2]).sum() for o, c in zip(outs, cases.values())).backward()
    return {name: {"y": _diff(o, c[3]), "dx": _diff(a.grad, c[4])}
            for (name, c), o, a in zip(cases.items(), outs, inputs)}


def layer_suite():
    ctx = ParallelContext.from_environment(2)
    if ctx.device.type == "cpu":
        return _layer_suite(ctx)
    with torch.device(ctx.device):  # every module and tensor below on the rank's GPU
        return _layer_suite(ctx)


def _layer_suite(ctx):
    transport = "shared_memory" if ctx.tp_comm.transport is not None else ctx.backend
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    out = {"transport": transport}
    out["linear"] = _mlp_case(ctx, nn.Linear(8, 12), nn.Linear(12, 8), x)
    out["conv1d"] = _mlp_case(ctx, Conv1D(12, 8), Conv1D(8, 12), x)
    out["linear_compiled"] = _mlp_case(ctx, nn.Linear(8, 12), nn.Linear(12, 8), x, compiled=True)
    out["conv1d_compiled"] = _mlp_case(ctx, Conv1D(12, 8), Conv1D(8, 12), x, compiled=True)

    # gather_output returns the full activation, equal to the dense one
    lin = nn.Linear(8, 6)
    col = ColumnParallelLinear.from_module(lin, _spec(ctx), ctx.tp_comm, gather_output=True)
    out["gather_output"] = {"y": _diff(col(x), lin(x))}

    # vocab of 7 on 2 ranks: padded to 8; padding_idx lives on rank 1
    emb = nn.Embedding(7, 4, padding_idx=5)
    ids = torch.tensor([[0, 3, 4, 6, 5, 2]])
    pemb = VocabParallelEmbedding.from_module(emb, contiguous_spec((7, 4), 0, ctx.tp_rank, 2, pad_to_multiple=True),
                                              ctx.tp_comm)
    e_ref, e = emb(ids), pemb(ids)
    e_ref.sum().backward()
    (e * 1.0).sum().backward()
    gfull = gather_full(pemb.weight.grad, pemb.weight.tp_spec, ctx.tp_group)
    out["embedding"] = {"y": _diff(e, e_ref), "dW": _diff(gfull, emb.weight.grad)}
    # ids nn.Embedding refuses: 7 is a padding row of rank 1's shard, -1 belongs to no rank
    # (CPU only: on a GPU the check is a device-side assert, which ends the process's CUDA context)
    out["embedding_bad_ids"] = []
    for bad in (7, -1) if ctx.device.type == "cpu" else ():
        try:
            pemb(torch.tensor([[0, bad]]))
        except IndexError as err:
            out["embedding_bad_ids"].append(str(err))

    # LM head + vocab-parallel CE vs full logits + F.cross_entropy (with ignored positions)
    head = nn.Linear(8, 7, bias=False)
    h = torch.randn(10, 8)
    target = torch.tensor([0, 6, 3, -100, 4, 5, 1, 2, -100, 6])
    hd = h.clone().requires_grad_(True)
    loss_ref = F.cross_entropy(head(hd), target, ignore_index=-100)
    loss_ref.backward()
    phead = ParallelLMHead.from_module(head, _spec(ctx, pad=True), ctx.tp_comm)
    ht = h.clone().requires_grad_(True)
    local = phead(ht)
    assert local.shape[-1] == 4  # training mode: local logits only
    loss = vocab_parallel_cross_entropy(local, target, vocab_start=phead.vocab_start, vocab_valid=phead.vocab_valid,
                                        group=ctx.tp_comm)
    loss.backward()
    gW = gather_full(phead.weight.grad, phead.weight.tp_spec, ctx.tp_group)
    phead.eval()
    with torch.no_grad():
        full_logits = phead(h)
    out["lm_head"] = {"loss": abs(loss.item() - loss_ref.item()), "dh": _diff(ht.grad, hd.grad),
                      "dW": _diff(gW, head.weight.grad), "eval_logits": _diff(full_logits, head(h)),
                      "eval_shape": tuple(full_logits.shape)}

    out.update(_shared_input_cases(ctx))
    out.update(_cross_entropy_cases(ctx))
    out["mappings"] = _mappings_case(ctx)
    out["mappings_compiled"] = _mappings_case(ctx, compiled=True)

    # A per-token norm split over the tokens (norms.py) vs the same norm unsplit: 2 x 5 tokens
    # split 5 + 5; 3 x 5 tokens are padded to 16 (8 + 8). The weight grad is TP-summed.
    from tp_trainer.parallel.grads import sync_partial_tp_grads
    from tp_trainer.parallel.norms import is_per_token_norm, split_norm_over_tokens

    for tokens, compiled in (((2, 5), False), ((3, 5), False), ((3, 5), True)):
        norm = nn.LayerNorm(8)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        split = nn.LayerNorm(8)
        split.load_state_dict(norm.state_dict())
        assert is_per_token_norm(split)
        split_norm_over_tokens(split, ctx.tp_comm, ctx.tp_size)
        xn = torch.randn(*tokens, 8)
        upstream = torch.randn(*tokens, 8)
        xd, xs = xn.clone().requires_grad_(True), xn.clone().requires_grad_(True)
        yd, ys = norm(xd), (_compiled(split) if compiled else split)(xs)
        (yd * upstream).sum().backward()
        (ys * upstream).sum().backward()
        sync_partial_tp_grads(split.parameters(), ctx.tp_comm)
        out[f"token_split_norm_{tokens[0]}x{tokens[1]}{'_compiled' if compiled else ''}"] = {
            "y": _diff(ys, yd), "dx": _diff(xs.grad, xd.grad), "dW": _diff(split.weight.grad, norm.weight.grad),
            "db": _diff(split.bias.grad, norm.bias.grad)}
    return out


_GLOO_ONLY = "the transports of gloo ranks on CPU tensors"
TRANSPORTS = [pytest.param("shared_memory", marks=pytest.mark.cpu_only(reason=_GLOO_ONLY)),
              pytest.param("gloo", marks=pytest.mark.cpu_only(reason=_GLOO_ONLY))]
if TEST_BACKEND != "gloo":
    TRANSPORTS.append(TEST_BACKEND)


@pytest.fixture(scope="module", params=TRANSPORTS)
def results(request):
    env = {"TP_TRAINER_SHM_ALLREDUCE": "1" if request.param == "shared_memory" else "0"}
    out = run_distributed(layer_suite, 2, env=env)
    for r in out:  # the run used the transport it was meant to test
        assert r.pop("transport") == request.param
    return out


@pytest.mark.parametrize("case", ["linear", "conv1d", "gather_output", "embedding", "token_split_norm_2x5",
                                  "token_split_norm_3x5", "shared_input", "shared_input_unused_output",
                                  "shared_input_one_output_used", "shared_input_autocast_bf16", "linear_compiled",
                                  "conv1d_compiled", "shared_input_compiled", "token_split_norm_3x5_compiled"])
def test_layer_matches_dense(results, case):
    tol = AUTOCAST_RTOL if "autocast" in case else ATOL
    for rank_result in results:
        for quantity, diff in rank_result[case].items():
            assert diff < tol, f"{case}.{quantity}: max |tp - dense| = {diff}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_every_mapping_is_its_forward_backward_pair(results, compiled):
    for rank_result in results:
        cases = rank_result["mappings_compiled" if compiled else "mappings"]
        assert len(cases) == 8
        for name, diffs in cases.items():
            for quantity, diff in diffs.items():
                assert diff < ATOL, f"{name}.{quantity}: {diff}"


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_qkv_layers_share_one_input_gradient_all_reduce(results, mode):
    # one f node (mappings.copy_to_tp_region_once) serves q, k and v: autograd sums their partial input
    # gradients, [3, 5, 8], before a single all-reduce, in eager and compiled mode alike
    key = "shared_input_compiled_all_reduces" if mode == "compiled" else "shared_input_all_reduces"
    for rank_result in results:
        assert rank_result[key] == [(3, 5, 8)]


@pytest.mark.cpu_only(reason="on a GPU the id check is a device-side assert (layers.py), fatal to the CUDA context")
def test_vocab_parallel_embedding_refuses_ids_outside_the_vocabulary(results):
    for rank_result in results:  # before the all-reduce, so every rank raises and none waits for a peer
        errors = rank_result["embedding_bad_ids"]
        assert len(errors) == 2
        assert "token id 7 is out of range" in errors[0] and "vocabulary of 7" in errors[0]
        assert "token id -1 is out of range" in errors[1]


def test_lm_head_and_vocab_parallel_cross_entropy(results):
    for r in results:
        lm = r["lm_head"]
        assert lm.pop("eval_shape") == (10, 7)  # eval mode gathers full logits, padding dropped
        for quantity, diff in lm.items():
            assert diff < ATOL, f"lm_head.{quantity}: {diff}"


@pytest.mark.parametrize("case", ["ce_padded_column", "ce_rank_without_vocab", "ce_bf16_logits"])
def test_vocab_parallel_cross_entropy_matches_dense(results, case):
    # fp32 cases: ATOL (summation order only). bf16: the loss is computed in fp32 from the same
    # bf16 values (ATOL); the gradient is rounded to bf16 on return (< 2**-8 relative of values
    # below 1, i.e. < 4e-3; a missing rank's share would move it by ~0.3)
    for r in results:
        res = dict(r[case])
        if case == "ce_bf16_logits":
            assert res.pop("dtype") == "torch.bfloat16"
            assert res.pop("dz") < 4e-3
        for quantity, diff in res.items():
            assert diff < ATOL, f"{case}.{quantity}: {diff}"


def test_vocab_parallel_cross_entropy_refuses_a_second_backward(results):
    for r in results:
        assert "backward ran twice" in r["ce_second_backward_error"], r["ce_second_backward_error"]
