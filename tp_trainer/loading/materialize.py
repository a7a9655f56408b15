"""Checking the checkpoint against the model, then giving every ``meta`` tensor its values.

:func:`check_sources` runs on the unsharded ``meta`` model, before a byte is allocated: every
parameter must have a source (one of its names, tied names included, in the checkpoint) of
the model's shape; the error names the tensor, the keys looked for and the files.

:func:`materialize` runs on the sharded ``meta`` model (after ``apply_tensor_parallel``): a
parameter carrying ``tp_spec`` (a :class:`~tp_trainer.parallel.sharding.ShardSpec` along dim
``d`` with segments ``(start, length)``) gets the tensor of its local shape whose segment ``i``
is ``full[..., start_i : start_i + length_i, ...]`` (along ``d``), followed by zero rows up to
``local_size`` (vocabulary padding): exactly ``spec.shard(full)``, read one segment at a time
without the full tensor. Other parameters and the persistent buffers are read whole. Values
are cast to the dtype ``from_pretrained`` gives the tensor (the model's, or fp32 for
``_keep_in_fp32_modules``) and placed on the rank's device. Each ``meta`` tensor is replaced in
place (``torch.utils.swap_tensors``): tied modules keep sharing one object and the attributes
``apply_tensor_parallel`` set on it (``tp_spec``, ``tp_grad_sum``) stay.

Before that, on the unsharded model, :func:`compute_buffers` makes the non-persistent buffers
(rotary ``inv_freq``, Gemma's ``embed_scale``) and the persistent buffers absent from the
checkpoint as ``from_pretrained`` makes them: empty on the device, then the model's own
``initialize_weights``, which skips every tensor flagged ``_is_hf_initialized`` (here: every
parameter, still on ``meta``) and computes the rest. It must run before the plan is applied:
the TP layers take such values from the modules they replace, and the model's init code only
knows its own module classes.

No communication: each rank reads its own slices. Host memory: the loaded shards plus one
segment in flight (a Stack or Cat source: plus one of its pieces; a column split: plus the
reader's bounce buffer, :data:`~.files.BOUNCE_BYTES`).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from transformers.utils import logging

from .files import LoadError, SafetensorsDir
from .keys import KeyMap
from .sources import Source, read_box

logger = logging.get_logger(__name__)


def tensor_aliases(model: nn.Module) -> list[tuple[list[str], torch.Tensor, bool]]:
    """``(names, tensor, is_parameter)`` for every distinct parameter and buffer (tied ones once, all names)."""
    seen: dict[int, tuple[list[str], torch.Tensor, bool]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for kind, table in ((True, mod._parameters), (False, mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                entry = seen.setdefault(id(t), ([], t, kind))
                if name not in entry[0]:
                    entry[0].append(name)
    return list(seen.values())


def persistent_names(model: nn.Module) -> set[str]:
    """The names a state dict holds (parameters and persistent buffers, tied names included)."""
    return set(model.state_dict(keep_vars=True))


def _source_of(names: list[str], keymap: KeyMap) -> tuple[str, Source] | None:
    return next(((n, keymap.sources[n]) for n in names if n in keymap.sources), None)


def _required_source(names: list[str], keymap: KeyMap, files: SafetensorsDir) -> tuple[str, Source]:
    """``_source_of`` for a tensor that must have one by now (``check_sources`` and ``compute_buffers`` ran)."""
    found = _source_of(names, keymap)
    if found is None:
        raise LoadError(f"{' = '.join(names)} has no source in {files.path} and no value (an internal error: "
                        "check_sources and compute_buffers run first)")
    return found


def check_sources(model: nn.Module, keymap: KeyMap, files: SafetensorsDir) -> list[str]:
    """Raise :class:`LoadError` if a parameter has no source or one of another shape; returns the names of the
    persistent buffers the checkpoint lacks (they are initialised as ``from_pretrained`` does)."""
    errors, missing_buffers = [], []
    persistent = persistent_names(model)
    for names, t, is_param in tensor_aliases(model):
        found = _source_of(names, keymap)
        if found is None:
            if is_param:
                errors.append(f"{' = '.join(names)} {tuple(t.shape)} is not in the checkpoint (looked for "
                              f"{_looked_for(names)} in {_file_list(files)})")
            elif any(n in persistent for n in names):
                missing_buffers.append(names[0])
            continue
        name, src = found
        if tuple(src.shape) != tuple(t.shape):
            keys = src.keys()
            where = sorted({files.where(k) for k in keys})
            built = (f"checkpoint tensor {keys[0]}" if len(keys) == 1
                     else f"{len(keys)} checkpoint tensors ({keys[0]}, ...) combine into")
            errors.append(f"{name}: {built} shape {tuple(src.shape)} in {', '.join(where)}, but this model's "
                          f"{name} has shape {tuple(t.shape)}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise LoadError(f"cannot load {files.path}: " + "; ".join(errors[:5]) + more +
                        ". The checkpoint does not match this model's config (config.json, or the config "
                        "overrides passed to from_pretrained)")
    if missing_buffers:
        logger.warning(f"{files.path} lacks the buffers {missing_buffers[:5]}: initialised as from_pretrained does")
    return missing_buffers


def _looked_for(names: list[str]) -> str:
    return " or ".join(repr(n) for n in names)


def _file_list(files: SafetensorsDir) -> str:
    shown = ", ".join(os.path.join(files.path, f) for f in files.files[:3])
    return shown + (f" and {len(files.files) - 3} more files" if len(files.files) > 3 else "")


def target_dtypes(model: nn.Module, dtype_plan: dict) -> dict[str, torch.dtype]:
    """The dtype ``from_pretrained`` gives each state-dict tensor: a ``_keep_in_fp32_modules`` match
    (``dtype_plan``, matched as transformers matches it) or the dtype it was built with."""
    out = {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()}
    if dtype_plan:
        from transformers.core_model_loading import build_glob_alternation

        alternation, by_group, _ = build_glob_alternation(list(dtype_plan))
        for name in out:
            hit = alternation.search(name)
            if hit is not None:
                out[name] = dtype_plan[by_group[hit.lastgroup]]
    return out


def read_local(files: SafetensorsDir, src: Source, spec, full_shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``spec.shard(full)`` (``full`` itself when ``spec`` is None), cast to ``dtype`` on ``device``, reading
    only the rank's segments."""
    whole = tuple((0, n) for n in full_shape)
    if spec is None:
        return read_box(files, src, whole).to(device=device, dtype=dtype)
    segments = spec.local_segments
    if len(segments) == 1 and segments[0][1] == spec.local_size:  # one box is the whole shard: no second copy
        (start, length), = segments
        box = whole[:spec.dim] + ((start, start + length),) + whole[spec.dim + 1:]
        return read_box(files, src, box).to(device=device, dtype=dtype).contiguous()
    out = torch.empty(spec.local_shape, dtype=dtype, device=device)
    offset = 0
    for start, length in spec.local_segments:
        box = whole[:spec.dim] + ((start, start + length),) + whole[spec.dim + 1:]
        out.narrow(spec.dim, offset, length).copy_(read_box(files, src, box))
        offset += length
    if offset < spec.local_size:  # vocabulary padding: zero rows, as ShardSpec.shard pads
        out.narrow(spec.dim, offset, spec.local_size - offset).zero_()
    return out


def _swap_in(old: torch.Tensor, value: torch.Tensor) -> None:
    """Make the ``meta`` tensor ``old`` hold ``value`` (same object: ties, hooks and attributes survive); flagged
    ``_is_hf_initialized`` as transformers flags what it loaded."""
    attrs = dict(old.__dict__)
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    torch.utils.swap_tensors(old, new)
    old.__dict__.update(attrs)  # swap_tensors swaps the attribute dicts too: give old its own back
    old._is_hf_initialized = True


@torch.no_grad()
def compute_buffers(model: nn.Module, keymap: KeyMap, *, device: torch.device) -> list[str]:
    """On the unsharded ``meta`` model: the buffers the checkpoint does not hold, computed on ``device`` by the
    model's ``initialize_weights`` (every parameter flagged, so skipped); returns their names."""
    persistent = persistent_names(model)
    computed = []
    for names, t, is_param in tensor_aliases(model):
        if is_param:
            t._is_hf_initialized = True
        elif not (any(n in persistent for n in names) and _source_of(names, keymap) is not None):
            # a fresh tensor as transformers makes it: no attribute of the meta one (nn.Buffer's marker) carried over
            torch.utils.swap_tensors(t, torch.empty_like(t, device=device))
            computed.append(names[0])
    if computed:
        model.initialize_weights()
    for names, t, is_param in tensor_aliases(model):
        if is_param:
            del t._is_hf_initialized  # set again on each value loaded
    logger.debug(f"computed by the model's initialize_weights, as from_pretrained does: {computed}")
    return computed


@torch.no_grad()
def materialize(model: nn.Module, keymap: KeyMap, files: SafetensorsDir, *, device: torch.device,
                dtypes: dict[str, torch.dtype]) -> int:
    """Give every ``meta`` parameter and persistent buffer of the sharded ``model`` its values (module docstring);
    returns the bytes this rank holds now."""
    held = 0
    for names, t, is_param in tensor_aliases(model):
        if not t.is_meta:
            held += t.numel() * t.element_size()
            continue
        name, src = _required_source(names, keymap, files)
        spec = getattr(t, "tp_spec", None)
        full_shape = tuple(spec.full_shape) if spec is not None else tuple(t.shape)
        value = read_local(files, src, spec, full_shape, dtypes.get(name, t.dtype), device)
        held += value.numel() * value.element_size()
        _swap_in(t, value)
    return held


def read_local_rows(files: SafetensorsDir, src: Source, spec, full_shape: tuple[int, ...], dtype: torch.dtype,
                    lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` (dim 0) of ``spec.shard(full)`` (of ``full`` when ``spec`` is None), cast to ``dtype``, on
    the host: one box per TP segment that meets those rows, each box only the rows needed (along dim 0 when the
    TP split is along dim 0; the rows ``[lo, hi)`` of the segment's columns otherwise). Vocabulary padding rows or
    columns are zero, as ``ShardSpec.shard`` pads. A :class:`~.sources.Converted` source reads its full sources
    once (as :func:`read_local` does), the box is cut from them."""
    whole = tuple((0, n) for n in full_shape)
    rows = ((lo, hi),)
    if spec is None:
        return read_box(files, src, rows + whole[1:]).to(dtype=dtype)
    local = list(spec.local_shape)
    out = torch.empty([hi - lo] + local[1:], dtype=dtype)
    offset = 0
    for start, length in spec.local_segments:
        if spec.dim == 0:  # local rows [offset, offset + length) are full rows [start, start + length)
            a, b = max(lo, offset), min(hi, offset + length)
            if a < b:
                box = ((start + a - offset, start + b - offset),) + whole[1:]
                out.narrow(0, a - lo, b - a).copy_(read_box(files, src, box))
        elif hi > lo:
            box = rows + whole[1:spec.dim] + ((start, start + length),) + whole[spec.dim + 1:]
            out.narrow(spec.dim, offset, length).copy_(read_box(files, src, box))
        offset += length
    if offset < spec.local_size:  # vocabulary padding
        if spec.dim == 0:
            a = max(lo, offset)
            if a < hi:
                out.narrow(0, a - lo, hi - a).zero_()
        else:
            out.narrow(spec.dim, offset, spec.local_size - offset).zero_()
    return out


@torch.no_grad()
def materialize_dp_sharded(model: nn.Module, keymap: KeyMap, files: SafetensorsDir, *, context,
                           dtypes: dict[str, torch.dtype]) -> int:
    """ZeRO-3 while loading: shard the TP-sharded ``meta`` model over dp (:func:`~tp_trainer.zero.
    shard_parameters_over_dp`: fp32 master shards), allocate the shards on the rank's device (``to_empty``), and
    write into each parameter only this dp rank's rows of its TP-local tensor (:func:`read_local_rows`), cast to
    the tensor's load dtype then to the fp32 master: the values ``from_pretrained`` + ``apply_tensor_parallel`` +
    ``shard_parameters_over_dp`` give, bit for bit. The buffers :func:`compute_buffers` computed are kept (put
    back after ``to_empty``, which would leave them uninitialised); persistent buffers with a source are read
    whole. Per rank: the dp shards plus one box in flight. Returns the bytes this rank holds."""
    from torch.distributed.tensor import DTensor

    from ..zero.fully_sharded import dp_rows, shard_parameters_over_dp

    computed = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items()
                if buf is not None and not buf.is_meta]
    aliases = tensor_aliases(model)  # before sharding: the names of each parameter and buffer, ties included
    names_of = {id(t): names for names, t, _ in aliases}
    owners = [(mod, attr, names_of[id(t)]) for mod in model.modules()
              for table in (mod._parameters, mod._buffers) for attr, t in table.items()
              if t is not None and t.is_meta]
    shard_parameters_over_dp(model, context)
    model.to_empty(device=context.device)
    for mod, name, buf in computed:
        mod._buffers[name] = buf  # the computed value itself (to_empty left an uninitialised tensor)
    held, done = 0, set()
    for mod, attr, names in owners:
        t = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        if id(t) in done:  # tied: one tensor under several names
            continue
        done.add(id(t))
        name, src = _required_source(names, keymap, files)
        spec = getattr(t, "tp_spec", None)
        full_shape = tuple(spec.full_shape) if spec is not None else tuple(src.shape)
        dtype = dtypes.get(name, t.dtype)
        if isinstance(t, DTensor) and t.dim() > 0:
            lo, hi = dp_rows(t)
            shard = t.to_local()
            shard.copy_(read_local_rows(files, src, spec, full_shape, dtype, lo, hi))
            held += shard.untyped_storage().nbytes()
        else:  # a buffer (or a scalar): whole
            t.copy_(read_local(files, src, spec, full_shape, dtype, t.device))
            held += t.numel() * t.element_size()
        t._is_hf_initialized = True
    return held
