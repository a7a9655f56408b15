"""Checkpoint keys -> model tensors, with transformers' own renaming and conversion rules.

``from_pretrained`` renames checkpoint keys on load (``key_mapping``, legacy ``gamma``/``beta``,
``block_sparse_moe`` -> ``mlp``, a base-model prefix added or dropped) and builds some tensors
from several keys (MoE checkpoints store ``experts.N.w1``/``w3``, the model one fused
``experts.gate_up_proj``). :func:`map_sources` applies the same rules
(``conversion_mapping.get_model_conversion_mapping`` and ``core_model_loading.rename_source_key``,
in the same sorted key order, so the experts are stacked in the same order) and returns, for
every model tensor, a :mod:`.sources` expression of where its values come from. Each
conversion is first run on ``meta`` tensors (no data): that gives the tensors it produces and
their shapes; the chains of ``MergeModulelist``/``Concatenate``/``Transpose`` are then turned
into lazy expressions that read only the boxes asked for, anything else into a
:class:`~.sources.Converted` that runs transformers' operations on the whole sources.

:func:`resolve_ties` settles a checkpoint that holds both tensors of a tie as ``from_pretrained``
does after loading (tied when equal, untied otherwise), here before the plan is made; comparing
them reads both, block by block.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    Transpose,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)
from transformers.utils import logging

from .files import LoadError, SafetensorsDir
from .sources import Cat, Converted, Leaf, Source, Stack, Transposed, check_consistent, equal_sources

logger = logging.get_logger(__name__)


class KeyMap:
    """``sources``: model tensor name -> :class:`~.sources.Source`; ``unexpected``: checkpoint keys no model
    tensor uses; ``conversions``: the transforms that matched a key (transformers keeps them on the model as
    ``_weight_conversions`` so that ``save_pretrained`` writes the checkpoint's layout back)."""

    def __init__(self, sources: dict[str, Source], unexpected: list[str], conversions: list):
        self.sources, self.unexpected, self.conversions = sources, unexpected, conversions


def map_sources(model: nn.Module, files: SafetensorsDir, *, key_mapping: dict[str, str] | None = None) -> KeyMap:
    """The sources of every tensor of ``model`` (an unsharded model, on ``meta`` or not) in ``files``."""
    conversions = get_model_conversion_mapping(model, key_mapping)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    sources: dict[str, Source] = {}
    groups: dict[str, tuple[WeightConverter, dict[str, list[str]]]] = {}
    unexpected = []
    for key in sorted(files.tensors, key=dot_natural_key):  # transformers' order: experts stacked 0, 1, ..., 10
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as transformers does: the key needed no renaming
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if renamed not in expected:
            unexpected.append(key)
        elif pattern is None:
            info = files.info(key)
            sources[renamed] = Leaf(key, info.shape, info.dtype)
        else:
            groups.setdefault(renamed, (by_pattern[pattern], {}))[1].setdefault(pattern, []).append(key)
    for first, (converter, collected) in groups.items():
        for target, src in _converted_sources(model, files, first, converter, collected).items():
            if target in expected:
                sources[target] = src
    return KeyMap(sources, unexpected, [c for c in conversions if c.was_used()])


def resolve_ties(model: nn.Module, keymap: KeyMap, files: SafetensorsDir, dtypes: dict[str, torch.dtype]) -> None:
    """Ties of a checkpoint holding both tensors, as ``from_pretrained`` settles them after loading: equal values
    (compared block by block, cast to the model's dtype) stay tied and are read once; different ones are untied
    (the target gets a parameter of its own, still on ``meta``) with transformers' warning. Before planning."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if target not in keymap.sources or source not in keymap.sources:
            continue
        if equal_sources(files, keymap.sources[source], keymap.sources[target], dtypes.get(source, torch.float32)):
            del keymap.sources[target]
            continue
        logger.warning(f"The tied weights mapping and config for this model specifies to tie {source} to {target}, "
                       "but both are present in the checkpoints with different values, so we will NOT tie them. "
                       "You should update the config with `tie_word_embeddings=False` to silence this warning.")
        owner, _, attr = target.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad))
        tied.pop(target)


def _run(converter: WeightConverter, first: str, collected: dict[str, list[str]], read, config) -> dict:
    """transformers' conversion of ``collected`` (pattern -> keys), each key read by ``read(key)``."""
    conv = copy.deepcopy(converter)
    for pattern, keys in collected.items():
        for key in keys:
            conv.add_tensor(first, key, pattern, lambda key=key: read(key))
    out = conv.convert(first, model=None, config=config)
    return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}


def _converted_sources(model, files: SafetensorsDir, first: str, converter: WeightConverter,
                       collected: dict[str, list[str]]) -> dict[str, Source]:
    keys = [k for ks in collected.values() for k in ks]
    where = sorted({files.where(k) for k in keys})
    lazy = _lazy(converter, collected, files)
    problem = check_consistent(lazy) if lazy is not None else None
    if problem:
        raise LoadError(f"{first} is built from {len(keys)} checkpoint tensors in {where}, but {problem}: "
                        "the checkpoint does not match this model's config")
    try:  # on meta: the targets and their shapes, no data read
        produced = _run(converter, first, collected,
                        lambda k: torch.empty(files.info(k).shape, dtype=files.info(k).dtype, device="meta"),
                        model.config)
    except Exception as err:
        raise LoadError(f"transformers' conversion {converter!r} of {keys[:4]}{' ...' if len(keys) > 4 else ''} "
                        f"({where}) into {first} failed on meta tensors ({type(err).__name__}: {err}); tp_trainer "
                        "cannot read it shard by shard: load the model with transformers' from_pretrained and shard "
                        "it with plan_tensor_parallel + apply_tensor_parallel") from None
    out: dict[str, Source] = {}
    for target, meta in produced.items():
        if lazy is not None and len(produced) == 1 and tuple(lazy.shape) == tuple(meta.shape):
            out[target] = lazy
            continue

        def run(read, target=target):
            return _run(converter, first, collected, read, model.config)[target]
        out[target] = Converted(tuple(keys), tuple(meta.shape), meta.dtype, run,
                                " -> ".join(type(op).__name__ for op in converter.operations))
    return out


def _lazy(converter: WeightConverter, collected: dict[str, list[str]], files: SafetensorsDir) -> Source | None:
    """The chain of ``converter``'s operations as a lazy expression, or None when one of them has no lazy form."""
    values: dict[str, object] = {p: [_leaf(files, k) for k in collected[p]]
                                 for p in converter.source_patterns if p in collected}
    for op in converter.operations:
        if type(op) is MergeModulelist:
            values = {p: (Stack(op.dim, tuple(v)) if isinstance(v, list) else v) for p, v in values.items()}
        elif type(op) is Concatenate:
            items = []
            for v in values.values():  # in source-pattern order, as Concatenate reads them
                items.extend(v if isinstance(v, list) else [v])
            values = {"": Cat(op.dim, tuple(items))}
        elif type(op) is Transpose and not op.check_dims and len(values) == 1:
            (p, v), = values.items()
            if isinstance(v, list):
                if len(v) != 1:
                    return None
                v = v[0]
            values = {p: Transposed(op.dim0, op.dim1, v)}
        else:
            return None
    if len(values) != 1:
        return None
    result = next(iter(values.values()))
    if isinstance(result, list):
        return result[0] if len(result) == 1 else None
    return result


def _leaf(files: SafetensorsDir, key: str) -> Leaf:
    info = files.info(key)
    return Leaf(key, info.shape, info.dtype)
