"""The truncated model's random fp32 weights: initialised once on rank 0, shared by every rank through one mapped file.

Rank 0 initialises the model: constructed without torch's default initialisation, then
initialised once by the model's own ``initialize_weights`` (what ``from_pretrained`` does for
missing weights); a parameter that init leaves unset (pre-filled with NaN to tell) sends it back
to a plain ``from_config``. Its parameters and buffers are then copied into one shared file and
every rank (rank 0 included) points its tensors at that file: the full weights exist once in
memory whatever ``tp`` is, every rank sees the same bits, and the other ranks only construct the
(uninitialised, untouched) modules. The file is unlinked once all ranks mapped it; the sharded
layers copy their shards out of it as usual.

Layout: every distinct parameter and buffer (tied ones once), in module order, 64-byte aligned.
Communication (TP group): an ``all_gather_object`` of a digest of that layout (every rank must
have constructed the same tensors), a ``broadcast_object_list`` of the file's path from rank 0,
and a barrier before rank 0 unlinks it. The file is in ``/dev/shm`` when it has the room, else in
the run's temporary directory.
"""

from __future__ import annotations

import math
import os


def build_model(config, seed: int, group, rank: int, tp: int, shm_paths: tuple[str, str], threads: int = 1):
    """The truncated model with random fp32 weights, built once and mapped by every rank (see the module doc)."""
    import torch.nn as nn

    model = _construct(config, seed, initialise=False)
    if rank == 0:
        model = _initialise(model, config, seed, threads)  # leaves `threads` threads for the copy below
    _share_weights(model, group, rank, tp, shm_paths)
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    model.train()
    return model


def _construct(config, seed: int, *, initialise: bool):
    """``from_config`` in fp32: initialised by torch and the model (seeded), or left uninitialised (tied as usual)."""
    import torch
    from transformers import AutoModelForCausalLM

    if initialise:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from transformers import initialization as hf_init

    with hf_init.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if hasattr(model, "tie_weights"):  # as from_config ties them: the same tensors on every rank
        model.tie_weights()
    return model


def _initialise(model, config, seed: int, threads: int):
    """Rank 0: ``model`` initialised by its own ``initialize_weights``, or a plain ``from_config`` where that
    leaves a parameter unset. Runs with ``threads`` threads (the other ranks wait for the weights)."""
    import torch

    torch.set_num_threads(threads)  # the other ranks wait for the weights: their cores are free
    try:
        for p in model.parameters():
            if p.is_floating_point():
                p.data.fill_(math.nan)  # what initialize_weights leaves unset stays NaN
        for mod in model.modules():
            for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
                if hasattr(t, "_is_hf_initialized"):
                    del t._is_hf_initialized
            if hasattr(mod, "_is_hf_initialized"):
                del mod._is_hf_initialized
        torch.manual_seed(seed)
        model.initialize_weights()
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        # a NaN left anywhere makes the sum NaN (one pass, no temporary of the weights' size)
        complete = all(math.isfinite(float(p.detach().sum())) for p in model.parameters() if p.is_floating_point())
    except Exception:  # an older transformers, a model without initialize_weights
        complete = False
    return model if complete else _construct(config, seed, initialise=True)


def _share_weights(model, group, rank: int, tp: int, shm_paths: tuple[str, str]) -> None:
    """Rank 0 copies ``model``'s tensors into a new shared file; every rank then points its tensors at it."""
    import torch
    import torch.distributed as dist

    slots = _tensor_slots(model)
    total = max((off + nbytes for _, off, nbytes, _ in slots), default=0)
    _check_same_layout(slots, group, tp)
    chosen = [None]
    if rank == 0:
        chosen[0] = _create_shared_file(shm_paths, max(total, 1))
        buf = torch.from_file(chosen[0], shared=True, size=max(total, 1), dtype=torch.uint8)
        for tensor, off, nbytes, _ in slots:
            view = _view(buf, off, tensor)
            view.copy_(tensor.detach())
        torch.set_num_threads(1)
    if group is not None:
        dist.broadcast_object_list(chosen, src=0, group=group)
    if rank != 0:
        buf = torch.from_file(chosen[0], shared=True, size=max(total, 1), dtype=torch.uint8)
    for tensor, off, nbytes, owners in slots:
        view = _view(buf, off, tensor)
        for mod, kind, name in owners:
            if kind == "param":
                getattr(mod, name).data = view
            else:
                mod._buffers[name] = view
    if group is not None:
        dist.barrier(group=group)
    if rank == 0:
        os.unlink(chosen[0])  # the mappings stay; nothing is left behind


def _check_same_layout(slots, group, tp: int) -> None:
    """Raise unless every rank laid out the same tensors (offsets, shapes, dtypes): an all-gather of a digest."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha1(repr([(off, tuple(t.shape), str(t.dtype)) for t, off, _, _ in slots]).encode()).hexdigest()
    if group is not None:
        digests = [None] * tp
        dist.all_gather_object(digests, digest, group=group)
        if len(set(digests)) != 1:
            raise RuntimeError("the ranks constructed models with different parameters and buffers from one config")


def _tensor_slots(model):
    """``(tensor, byte offset, bytes, [(module, "param"|"buffer", name), ...])`` of every distinct
    parameter and buffer, in module order, 64-byte aligned."""
    slots, index, off = [], {}, 0
    for mod in model.modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) in index:
                    slots[index[id(t)]][3].append((mod, kind, name))
                    continue
                nbytes = t.numel() * t.element_size()
                index[id(t)] = len(slots)
                slots.append((t, off, nbytes, [(mod, kind, name)]))
                off += -(-nbytes // 64) * 64
    return slots


def _view(buf, off: int, like):
    import torch

    nbytes = like.numel() * like.element_size()
    return buf[off:off + nbytes].view(like.dtype).view(like.shape) if nbytes else torch.empty_like(like)


def _create_shared_file(paths: tuple[str, str], nbytes: int) -> str:
    """A new owner-only file of ``nbytes`` reserved bytes: in ``/dev/shm`` (memory) when it has the
    room, else in the run's temporary directory (page cache). Reserving now avoids a SIGBUS on a
    full tmpfs (Docker's default ``/dev/shm`` is 64 MB)."""
    for path in paths:
        if not os.path.isdir(os.path.dirname(path)):
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            continue
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return path
        except OSError:
            os.unlink(path)
        finally:
            os.close(fd)
    raise OSError(f"no room for the {nbytes / 2**30:.1f} GiB of shared weights in {' or '.join(paths)}")
