"""Where every linear sits in the residual stream, read from the tensors of one forward pass on ``meta``.

The module tree is not the dataflow: BERT's attention output projection lives in another module
(``BertSelfOutput``) than q/k/v, and adds the residual inside a post-norm,
``LayerNorm(dense(x) + input)``. :func:`trace_dataflow` follows the tensors instead. It runs one
forward (with labels) of a twin of the model on the ``meta`` device (no memory, no FLOPs) under a
``TorchDispatchMode`` that tags every tensor an aten op produces with its provenance
(:class:`Flow`):

* **stream**: the output of the input embedding, and everything computed from stream tensors
  without passing through a linear: residual adds, norms, dropout, scaling, position embeddings
  added to it. The stream is replicated on every TP rank.
* **from linears L**: a tensor computed from the outputs of the linears ``L`` (its *frontier*: the
  last linears on each path), with no stream tensor mixed in since. A linear's own output is
  ``{L}``; ``q @ k^T`` is ``{q, k}``.
* **params P**: computed only from parameters/buffers ``P`` and constants (masks, positions, T5's
  relative position bias table lookup).

An op that mixes a stream tensor with anything gives stream (a residual add), and the linears of
its other operands *write into the stream*. An op that mixes linear outputs with parameter-only
tensors records that those parameters are applied to the linears' outputs (a ``q_norm``
weight, attention sinks, T5's position bias, a bias added to the logits). Linears are leaves:
their forward hooks tag their input and output and nothing inside them is traced (their bias).

From that, :class:`Dataflow` says per linear: it *reads the stream* (column-parallel candidate),
*reads other linears' outputs* (inside a parallel region) and/or *writes the stream*
(row-parallel when it also reads a region: its output is added to the residual, directly, after
dropout/a norm, or inside a post-norm as in BERT). The planner (:mod:`.planner`) groups them into
regions, column-parallel linears -> ... -> row-parallel linears.

**Fused layouts.** Every linear that reads the stream also gets a *shadow*: a real CPU tensor of
its output's shape holding each element's output-feature index. Shape ops (views, transposes,
splits, chunks, slices, selects, unbinds) are replayed on the shadow; the first other op that
consumes a shadowed tensor records the set of output features it consumed (a *piece*) and, when
the features were reshaped into more dims than the linear produced, the innermost feature dim
(the *head size*). A fused ``[q | k | v]`` projection shows as three contiguous pieces consumed
separately, a ``[gate | up]`` projection chunked in forward as two, a per-head interleaved
``[h0: q k v | h1: ...]`` one as interleaved pieces that repeat every ``N / heads`` features:
:meth:`Dataflow.layout` turns them into a :class:`Layout`, never into a plain column split.
Head counts and widths come from these pieces, i.e. from what the forward does with the weights,
not from config fields.

Loss: the twin's ``loss_function`` is replaced by a sentinel for the traced forward. Whether the
model called it, and whether the logits of the output embedding reached a ``log_softmax``
outside it (a cross-entropy computed inline, as BERT's ``CrossEntropyLoss()``), tells the planner
whether the vocab-parallel loss can replace the model's or the LM head must gather its logits.

When the twin cannot be built or run, :func:`trace_dataflow` returns ``None`` with the reason in
:data:`last_failure`; the planner then falls back to its module-order heuristic and says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from transformers.utils import logging

from .model_info import is_linear, meta_inputs, record_first_calls

logger = logging.get_logger(__name__)
aten = torch.ops.aten

TRACE_SEQ_LEN = 4  # tokens of the traced forward (as the call-order trace always used)
_NO_HEADS = 1 << 62  # head unit of a shadow whose features were never reshaped into heads

# Ops that only rearrange their input's elements: replayed on the feature-index shadow.
_SHAPE_OPS = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.t, aten.permute, aten.unsqueeze,
              aten.squeeze, aten.expand, aten.clone, aten.contiguous, aten.split, aten.split_with_sizes,
              aten.unsafe_split, aten.unbind, aten.slice, aten.select, aten.narrow, aten.alias, aten.detach,
              aten.chunk, aten.movedim, aten.flatten, aten.unflatten, aten.view_as, aten.expand_as, aten.index,
              aten.index_select, aten.lift_fresh}
_CAST_OPS = {aten._to_copy, aten.to}  # dtype/device only: the shadow passes unchanged
# New tensors that take only a shape/dtype from their input: no provenance.
_FACTORY_LIKE = {aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.empty_like, aten.zeros_like,
                 aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like, aten.randint_like,
                 aten.new_empty_strided}
_LOG_SOFTMAX = {aten._log_softmax, aten.log_softmax}


@dataclass(frozen=True)
class Flow:
    """Provenance of a tensor: stream-derived, the frontier of linears it comes from, or parameters only."""

    stream: bool = False
    linears: frozenset = frozenset()
    params: frozenset = frozenset()


CONST = Flow()
STREAM = Flow(stream=True)


@dataclass(frozen=True)
class Layout:
    """How a linear's output features are consumed.

    ``blocks``: contiguous pieces ``(size, heads)`` in feature order (``heads == 0``: consumed
    feature-wise, e.g. an MLP half, splittable anywhere). ``groups``: an interleaved layout that
    repeats every ``N / groups`` features (per head or per KV group): a contiguous split is aligned
    when it cuts between groups. Exactly one of the two is set."""

    blocks: tuple[tuple[int, int], ...] | None = None
    groups: int | None = None
    head_dim: int = 0

    @property
    def fused(self) -> bool:
        return self.groups is not None or (self.blocks is not None and len(self.blocks) > 1)

    def describe(self) -> str:
        if self.groups is not None:
            return f"{self.groups} interleaved groups"
        parts = [f"{size}" + (f" ({heads} heads)" if heads else "") for size, heads in self.blocks]
        return ("pieces " if len(parts) > 1 else "") + " | ".join(parts)


@dataclass(frozen=True)
class ParamUse:
    """A parameter (or buffer) applied to linears' outputs: which linears, and whether it only ever varied
    along the last dim of the tensor it met (a per-feature weight such as a norm's, as opposed to a
    per-head one: attention sinks ``[heads]`` viewed ``[1, heads, 1, 1]``, T5's bias ``[1, heads, q, k]``)."""

    linears: frozenset = frozenset()
    per_feature: bool = True


@dataclass
class LinearFlow:
    """What one linear's calls read and where its output went."""

    name: str
    width: int                 # output features
    inputs: list[Flow] = field(default_factory=list)
    writes_stream: bool = False

    @property
    def reads_stream(self) -> bool:
        return any(f.stream for f in self.inputs)

    @property
    def reads_linears(self) -> frozenset:
        out: frozenset = frozenset()
        for f in self.inputs:
            out |= f.linears
        return out

    @property
    def role(self) -> str:
        """``reader`` (every call reads the pure stream), ``inner`` (every call reads linear outputs only),
        ``other`` (constants, parameters, or a mix across calls)."""
        if self.inputs and all(f.stream for f in self.inputs):
            return "reader"
        if self.inputs and all(f.linears and not f.stream for f in self.inputs):
            return "inner"
        return "other"


@dataclass
class Dataflow:
    order: list[str]                        # parameter-owning modules, first-call order
    linears: dict[str, LinearFlow]          # every linear called, by name
    param_uses: dict[str, ParamUse]         # "module.param" -> the linears whose outputs it was applied to
    embeddings: list[str]                   # modules whose output was tagged as the stream (input embeddings)
    output_embedding: str | None
    loss: str                               # "loss_function", "inline", "none" or "not traced"
    pieces: dict[str, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    lost_layout: dict[str, str] = field(default_factory=dict)  # linear -> why its feature shadow was lost

    def split_apart(self, name: str) -> bool:
        """Whether the forward consumed separate pieces of this linear's output (a fused projection)."""
        return name not in self.lost_layout and len(_maximal(self.pieces.get(name, []))) > 1

    def layout(self, name: str) -> Layout | None:
        """The :class:`Layout` of a stream-reading linear's output, ``None`` when the trace cannot tell
        (its shadow was lost in an op that mixes it with other tensors, or pieces overlap)."""
        if name in self.lost_layout or not self.pieces.get(name):
            return None
        width = self.linears[name].width
        pieces = _maximal(self.pieces[name])
        covered = sum(int(p.numel()) for p, _ in pieces)
        if covered != width:
            return None  # part of the output unused, or overlapping pieces
        pieces.sort(key=lambda pu: int(pu[0][0]))
        if all(int(p[-1] - p[0]) + 1 == p.numel() for p, _ in pieces):
            blocks = tuple((int(p.numel()), int(p.numel()) // unit if unit > 1 else 0) for p, unit in pieces)
            head_dim = max((unit for _, unit in pieces if unit > 1), default=0)
            return Layout(blocks=blocks, head_dim=head_dim)
        groups = _interleave_groups([p for p, _ in pieces], width)
        if groups is None:
            return None
        return Layout(groups=groups, head_dim=max((unit for _, unit in pieces), default=0))


def _maximal(pieces: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    """Drop pieces contained in a larger one (``x[..., :d/2]`` of a rotary half inside ``q``)."""
    ordered = sorted(pieces, key=lambda pu: -pu[0].numel())
    kept: list[tuple[torch.Tensor, int]] = []
    for p, unit in ordered:
        if any(bool(torch.isin(p, q).all()) for q, _ in kept):
            continue
        kept.append((p, unit))
    return kept


def _interleave_groups(pieces: list[torch.Tensor], width: int) -> int | None:
    """The largest ``G`` such that every piece has the same share, at the same offsets, of each of the
    ``G`` consecutive chunks of ``width / G`` features; ``None`` when only ``G = 1`` works."""
    for groups in sorted((g for g in range(2, width + 1) if width % g == 0), reverse=True):
        chunk = width // groups
        ok = True
        for p in pieces:
            if p.numel() % groups:
                ok = False
                break
            rows = p.view(groups, -1)
            if not bool((rows // chunk == torch.arange(groups).unsqueeze(1)).all()) or not bool(
                    (rows % chunk == rows[:1] % chunk).all()):
                ok = False
                break
        if ok:
            return groups
    return None


# ------------------------------------------------------------------------------------------- trace
class _Tracer(TorchDispatchMode):
    def __init__(self, twin: nn.Module, stream_modules: set[str], output_embedding: str | None):
        super().__init__()
        self.names = {id(t): n for n, t in list(twin.named_parameters(remove_duplicate=False))
                      + list(twin.named_buffers(remove_duplicate=False))}
        self.suppress = 0
        self.linears: dict[str, LinearFlow] = {}
        self.param_uses: dict[str, ParamUse] = {}
        self.pieces: dict[str, list[tuple[torch.Tensor, int]]] = defaultdict(list)
        self.piece_keys: dict[str, set] = defaultdict(set)
        self.lost: dict[str, str] = {}
        self.out_ndim: dict[str, int] = {}
        self.stream_modules = stream_modules
        self.embeddings: list[str] = []
        self.output_embedding = output_embedding
        self.inline_loss = False
        self.error: str | None = None

    # ---- tags
    def flow(self, t) -> Flow:
        f = getattr(t, "_tpf_flow", None)
        if f is not None:
            return f
        name = self.names.get(id(t))
        return Flow(params=frozenset({name})) if name is not None else CONST

    def _tag(self, t: torch.Tensor, flow: Flow) -> None:
        try:
            t._tpf_flow = flow
        except (AttributeError, TypeError):  # a tensor subclass that refuses attributes: stays untagged
            pass

    # ---- module hooks
    def linear_pre(self, name: str, width: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not self.suppress and isinstance(x, torch.Tensor):
                self.linears.setdefault(name, LinearFlow(name, width)).inputs.append(self.flow(x))
                if hasattr(x, "_tpf_shadow"):
                    self._consume(x)
            self.suppress += 1
        return hook

    def linear_post(self, name: str):
        def hook(module, args, kwargs, out):
            self.suppress -= 1
            if self.suppress or not isinstance(out, torch.Tensor):
                return
            self._tag(out, Flow(linears=frozenset({name})))
            use = self.linears.get(name)
            if use is not None and use.inputs and use.inputs[-1] == STREAM and out.dim() >= 1:
                self.out_ndim[name] = out.dim()
                width = out.shape[-1]
                try:
                    features = torch.arange(width, dtype=torch.int32).expand(tuple(out.shape)).contiguous()
                    out._tpf_shadow = (name, features, _NO_HEADS)
                except (AttributeError, TypeError):
                    self.lost[name] = "its output refuses attributes"
        return hook

    def stream_pre(self, name: str):
        def hook(module, args, kwargs):
            self.suppress += 1
        return hook

    def stream_post(self, name: str):
        def hook(module, args, kwargs, out):
            self.suppress -= 1
            if not self.suppress and isinstance(out, torch.Tensor):
                self._tag(out, STREAM)
                if name not in self.embeddings:
                    self.embeddings.append(name)
        return hook

    # ---- ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress or self.error is not None:
            return out
        try:
            self._follow(func, args, kwargs, out)
        except Exception as err:  # a bookkeeping failure makes the whole trace unusable, never the forward fail
            self.error = f"{func}: {type(err).__name__}: {err}"
        return out

    def _follow(self, func, args, kwargs, out) -> None:
        packet = func.overloadpacket
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if packet in _FACTORY_LIKE:
            for t in outs:
                self._tag(t, CONST)
            return
        flows = [self.flow(t) for t in ins]
        result = self._combine(flows, ins, outs)
        if packet in _LOG_SOFTMAX and self.output_embedding is not None and any(
                self.output_embedding in f.linears for f in flows):
            self.inline_loss = True
        shadowed = [t for t in ins if hasattr(t, "_tpf_shadow")]
        for t in outs:
            self._tag(t, result)
        if shadowed:
            if packet in _SHAPE_OPS or packet in _CAST_OPS:
                self._replay(func, packet, args, kwargs, out, shadowed)
            else:
                for t in shadowed:
                    self._consume(t)

    def _combine(self, flows: list[Flow], ins: list[torch.Tensor], outs: list[torch.Tensor]) -> Flow:
        if any(f.stream for f in flows):
            for f in flows:
                if not f.stream:
                    for name in f.linears:
                        if name in self.linears:
                            self.linears[name].writes_stream = True
            return STREAM
        linears = frozenset().union(*(f.linears for f in flows)) if flows else frozenset()
        if linears:
            ndim = max((t.dim() for t in outs), default=0)
            for f, t in zip(flows, ins):
                if f.params and not f.linears:
                    # the dims (aligned from the right with the result) along which the parameter varies
                    varying = [d for d in range(1, t.dim() + 1) if t.shape[-d] > 1]
                    per_feature = varying in ([], [1]) or ndim <= 1
                    for p in f.params:
                        old = self.param_uses.get(p, ParamUse())
                        self.param_uses[p] = ParamUse(old.linears | linears, old.per_feature and per_feature)
            return Flow(linears=linears)
        params = frozenset().union(*(f.params for f in flows)) if flows else frozenset()
        return Flow(params=params) if params else CONST

    def _replay(self, func, packet, args, kwargs, out, shadowed) -> None:
        owners = {t._tpf_shadow[0] for t in shadowed}
        if len(owners) != 1:
            for t in shadowed:
                self._consume(t)
            return
        owner = owners.pop()

        def sub(a):
            return a._tpf_shadow[1] if isinstance(a, torch.Tensor) and hasattr(a, "_tpf_shadow") else a

        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        try:
            if packet in _CAST_OPS:
                results = [shadowed[0]._tpf_shadow[1]]
            else:
                sargs, skwargs = tree_map(sub, args), tree_map(sub, kwargs)
                if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in tree_leaves((sargs, skwargs))):
                    raise RuntimeError(f"{packet} mixes it with a tensor of unknown values")
                results = [t for t in tree_leaves(func(*sargs, **skwargs)) if isinstance(t, torch.Tensor)]
        except Exception as err:  # an op the shadow cannot follow: the layout stays unknown
            self.lost.setdefault(owner, f"{type(err).__name__}: {err}")
            return
        unit = min(t._tpf_shadow[2] for t in shadowed)
        for o, r in zip(outs, results):
            if tuple(o.shape) == tuple(r.shape):
                try:
                    o._tpf_shadow = (owner, r, min(unit, self._head_unit(owner, r)))
                except (AttributeError, TypeError):
                    self.lost.setdefault(owner, "a view refuses attributes")

    def _head_unit(self, owner: str, shadow: torch.Tensor) -> int:
        """The innermost feature dim's size when ``shadow`` has the features reshaped into more dims than
        the linear produced (``[b, s, heads, d]`` -> ``d``); a large number otherwise ("no heads yet")."""
        if shadow.dim() > self.out_ndim.get(owner, shadow.dim()):
            for dim in reversed(range(shadow.dim())):
                n = shadow.shape[dim]
                if n > 1 and bool((shadow.narrow(dim, 1, n - 1) - shadow.narrow(dim, 0, n - 1) == 1).all()):
                    return n
        return _NO_HEADS

    def _consume(self, t: torch.Tensor) -> None:
        owner, shadow, unit = t._tpf_shadow
        if owner in self.lost:
            return
        if shadow.numel() == 0:  # an empty slice consumes nothing
            return
        values = torch.unique(shadow)
        key = (int(values.numel()), int(values[0]), int(values[-1]), int(values.sum()))
        unit = min(unit, self._head_unit(owner, shadow))
        unit = 1 if unit == _NO_HEADS else unit  # consumed feature-wise (an MLP's activations)
        if (key, unit) in self.piece_keys[owner]:
            return
        self.piece_keys[owner].add((key, unit))
        self.pieces[owner].append((values, unit))


class _LossSentinel:
    """Stands in for ``model.loss_function`` during the trace: records the call, returns a meta scalar."""

    def __init__(self, tracer: _Tracer):
        self.tracer, self.called = tracer, False

    def __call__(self, logits, *args, **kwargs):
        self.called = True
        return logits.float().sum() * 0.0


last_failure: str | None = None  # why the last trace_dataflow returned None (for the plan's note)


def trace_dataflow(model: nn.Module) -> Dataflow | None:
    """The :class:`Dataflow` of one labelled forward of a meta twin of ``model``; ``None`` when the twin
    cannot be built or run (the reason in :data:`last_failure`)."""
    global last_failure
    last_failure = None
    from .validate import _first_twin

    twin, _, problem = _first_twin(model)  # built from the config, or a meta copy of a model changed since
    if twin is None:
        last_failure = f"no meta-device twin of the model: {problem}"
        return None
    modules = dict(twin.named_modules())
    names = {id(m): n for n, m in modules.items()}
    emb_in = twin.get_input_embeddings() if hasattr(twin, "get_input_embeddings") else None
    emb_out = twin.get_output_embeddings() if hasattr(twin, "get_output_embeddings") else None
    out_name = names.get(id(emb_out)) if emb_out is not None and is_linear(emb_out) else None
    stream = set()
    if emb_in is not None:
        stream = {n for n, m in modules.items()
                  if m is emb_in or (isinstance(m, nn.Embedding) and m.weight is getattr(emb_in, "weight", None))}
    try:
        kwargs = meta_inputs(twin, TRACE_SEQ_LEN, labels=True)  # runs one forward: before any hook is set
    except Exception as err:
        last_failure = f"a meta-device forward of the model fails ({type(err).__name__}: {_first_line(err)})"
        return None
    tracer = _Tracer(twin, stream, out_name)
    order, handles = record_first_calls(modules)
    for name, mod in modules.items():
        if is_linear(mod):
            width = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.out_features
            handles.append(mod.register_forward_pre_hook(tracer.linear_pre(name, width), with_kwargs=True))
            handles.append(mod.register_forward_hook(tracer.linear_post(name), with_kwargs=True))
        elif name in stream:
            handles.append(mod.register_forward_pre_hook(tracer.stream_pre(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(tracer.stream_post(name), with_kwargs=True))
    sentinel = _LossSentinel(tracer)
    loss = "not traced"
    try:
        from .validate import _meta_data_dependent_ops

        if hasattr(type(twin), "loss_function"):
            twin.loss_function = sentinel
        with torch.no_grad(), _meta_data_dependent_ops(), tracer:
            out = twin(**kwargs)
        has_loss = getattr(out, "loss", None) is not None
        loss = "loss_function" if sentinel.called else "inline" if tracer.inline_loss else (
            "inline" if has_loss else "none")
    except Exception as err:  # data-dependent code, custom forward signatures
        last_failure = f"a meta-device forward of the model fails ({type(err).__name__}: {_first_line(err)})"
        logger.info(f"tp_trainer planner: dataflow trace failed: {last_failure}")
        return None
    finally:
        for h in handles:
            h.remove()
    if tracer.error is not None:
        last_failure = f"the dataflow trace could not follow an op ({tracer.error})"
        return None
    if not tracer.embeddings:
        last_failure = "the traced forward never called the input embedding, so no residual stream was seen"
        return None
    flow = Dataflow(order=order, linears=dict(tracer.linears), param_uses=dict(tracer.param_uses),
                    embeddings=list(tracer.embeddings), output_embedding=out_name, loss=loss,
                    pieces={k: v for k, v in tracer.pieces.items()}, lost_layout=dict(tracer.lost))
    return flow


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else repr(err)
