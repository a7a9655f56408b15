"""Writing sharded checkpoints: every rank its own files, rank 0 the manifest, one atomic rename.

Collectives: one ``all_gather_object`` of each rank's file checksums and optimizer-piece index
(small), one of rank 0's outcome (which doubles as the final barrier). A rank that fails reports
its error to every rank instead of leaving them blocked.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..parallel.gather import persistent_buffers
from ..parallel.lora import is_peft_model
from .export import resolve_save_dtype
from .lora import write_adapter_configs, writes_adapter_directory
from .fully_sharded import is_dp_sharded, write_dp_sharded_model_file
from .layout import (FORMAT, GROUPS, MANIFEST, SCALER, SCHEDULER, TMP_PREFIX, TRAINER_STATE, VERSION,
                     CheckpointSaveError,
                     _all_gather_object, _barrier, _finish_file, _fsync, _full_shape, _rng_states, _spec_record,
                     _versions, is_complete, unwrap_optimizer)

logger = logging.get_logger(__name__)


def save_training_checkpoint(trainer, trial=None) -> str:
    """Everything ``Trainer._save_checkpoint`` saves, sharded and atomic; returns the final path.

    Called on every rank (collective). Mirrors the Trainer's bookkeeping: ``store_flos``, the best
    model checkpoint, stateful callbacks, rotation.
    """
    args, state, ctx = trainer.args, trainer.state, trainer.tp_context
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = trainer._get_output_dir(trial=trial)
    final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if state.best_global_step:
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if os.path.exists(best) or best == final:
            state.best_model_checkpoint = best
    for cb in trainer.callback_handler.callbacks + [trainer.control]:  # as Trainer._save_checkpoint does
        if isinstance(cb, ExportableState):
            name = type(cb).__name__
            if isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name].append(cb.state())
            else:
                state.stateful_callbacks[name] = cb.state()

    write_checkpoint(final, model=trainer.model, optimizer=trainer.optimizer, ctx=ctx,
                     zero_stage=args.zero_stage, save_only_model=args.save_only_model,
                     save_dtype=resolve_save_dtype(args, trainer.model), extras=_RankZeroExtras(trainer))
    # only after a save that succeeded on every rank: a failed one raised above, so nothing is rotated away
    if ctx.rank == 0:
        try:
            rotate_checkpoints(run_dir, args.save_total_limit, state.best_model_checkpoint)
        except OSError as err:  # the new checkpoint is complete: a failed clean-up of old ones is not fatal
            logger.warning(f"rotating the checkpoints of {run_dir} failed ({err}); the older checkpoints stay")
    _barrier(ctx)
    return final


class _RankZeroExtras:
    """The small, topology-independent files rank 0 adds (scheduler, trainer state, config, tokenizer)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def write(self, directory: str, *, save_only_model: bool) -> None:
        t = self.trainer
        if not save_only_model:
            if t.lr_scheduler is not None:
                torch.save(t.lr_scheduler.state_dict(), os.path.join(directory, SCHEDULER))
            scaler = getattr(t.accelerator, "scaler", None)
            if scaler is not None:
                torch.save(scaler.state_dict(), os.path.join(directory, SCALER))
        t.state.save_to_json(os.path.join(directory, TRAINER_STATE))
        torch.save(t.args, os.path.join(directory, "training_args.bin"))
        write_model_metadata(t.model, directory, t.processing_class)


def write_model_metadata(model, directory: str, processing_class=None) -> None:
    """config.json, generation_config.json and the tokenizer, as ``save_pretrained`` writes them; for a PEFT
    model, the inner Hugging Face model's config and the adapters' ``adapter_config.json``."""
    if writes_adapter_directory(model):
        write_adapter_configs(model, directory)
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is not None:
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(directory)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(directory)


def write_checkpoint(final: str, *, model, optimizer, ctx, zero_stage: int, save_only_model: bool = False,
                     save_dtype: torch.dtype = torch.float32, extras=None) -> None:
    """Write ``final`` atomically from every rank (collective); see the module docstring.

    A rank that fails (disk full, read-only or removed directory, ...) reports instead of leaving the others
    blocked: each step ends with an all-gather of every rank's outcome (rank 0's preparation, every rank's
    files, rank 0's manifest and rename), and on any failure every rank raises the same
    :class:`CheckpointSaveError`, the partial temporary directory is removed and nothing is published.
    """
    parent, name = os.path.split(os.path.abspath(final))
    tmp = os.path.join(parent, TMP_PREFIX + name)
    prepared = _attempt(_prepare, parent, name, tmp) if ctx.rank == 0 else None
    _raise_if_failed(_all_gather_object(prepared, ctx), final, tmp, ctx)  # also the barrier before the writes
    optimizer = None if save_only_model else unwrap_optimizer(optimizer)
    gathered = _all_gather_object(_attempt(_write_rank_files, tmp, model, optimizer, ctx, tmp=tmp), ctx)
    _raise_if_failed(gathered, final, tmp, ctx)
    outcome = None
    if ctx.rank == 0:
        outcome = _attempt(_finish_on_rank0, tmp, final, [g[0] for g in gathered], model=model, optimizer=optimizer,
                           ctx=ctx, zero_stage=zero_stage, save_dtype=save_dtype, extras=extras,
                           save_only_model=save_only_model, tmp=tmp)
    _raise_if_failed(_all_gather_object(outcome, ctx), final, tmp, ctx)


def _prepare(parent: str, name: str, tmp: str) -> None:
    """Rank 0: the output directory, no stale temporary directories, a fresh ``tmp``."""
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # leftovers of killed saves: never complete, never resumed from
        if stale.startswith(TMP_PREFIX + PREFIX_CHECKPOINT_DIR) or stale == TMP_PREFIX + name:
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    os.makedirs(tmp)


def _attempt(fn, *args, tmp: str | None = None, **kwargs) -> tuple:
    """``(result, None)`` or ``(None, failure)``: a small picklable record of the error (its text, its errno,
    whether ``tmp``, given once it exists, has disappeared meanwhile)."""
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # reported to every rank by the caller
        return None, {"error": f"{type(err).__name__}: {err}", "errno": _errno_of(err),
                      "removed": tmp is not None and not os.path.isdir(tmp)}


_OS_ERROR_CODE = re.compile(r"(?:os error |code: )(\d+)")  # safetensors' Rust I/O errors carry the errno as text


def _errno_of(err: BaseException) -> int | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        if m := _OS_ERROR_CODE.search(str(err)):
            return int(m.group(1))
        err = err.__cause__ or err.__context__
    return None


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_fault(directory: str, code: int | None, *, removed: bool = False) -> tuple[str, str] | None:
    """``(cause, fix)`` of a failed write under ``directory``, or ``None`` when it is not a storage fault."""
    if removed or code == errno.ENOENT:
        return (f"{directory} was removed while saving",
                ("something else deleted it during the save (a clean-up job, another run sharing output_dir): "
                 "give each run its own output_dir and keep other tools out of it while training"))
    if code in _NO_SPACE:
        return (f"no space left on device (or the disk quota is exhausted) for {directory}",
                ("free space on that file system, lower save_total_limit so that fewer checkpoints are kept, "
                 "or set output_dir to a larger disk"))
    if code in _NOT_WRITABLE:
        return (f"{directory} is read-only / not writable",
                ("make it writable (remount the file system read-write, fix its owner or permissions) or set "
                 "output_dir to a writable directory"))
    return None


def _raise_if_failed(outcomes: list, final: str, tmp: str, ctx) -> None:
    failed = [(r, o[1]) for r, o in enumerate(outcomes) if o is not None and o[1] is not None]
    if not failed:
        return
    if ctx.rank == 0:  # every rank is past its writes (this follows a collective): remove the partial save
        shutil.rmtree(tmp, ignore_errors=True)
    parent = os.path.dirname(final)
    first = failed[0][1]
    details = "; ".join(f"rank {r}: {f['error']}" for r, f in failed)
    fault = storage_fault(parent, first["errno"], removed=any(f["removed"] for _, f in failed))
    if fault is not None and "removed" in fault[0] and os.path.isdir(parent):
        fault = (f"{tmp} was removed while saving", fault[1])
    cause, fix = fault or ("the error above", "fix its cause")
    newest = _newest_complete(parent)
    intact = (f"the newest complete one, {newest}, is what resume_from_checkpoint: auto resumes from"
              if newest else "there is no earlier complete checkpoint in it")
    error = CheckpointSaveError(
        f"saving {final} failed ({details}): {cause}. Fix: {fix}. Nothing was published and the earlier "
        f"checkpoints are intact ({intact}); the partial {tmp} is removed (or, if that fails too, by the next save)")
    error.errno, error.filename = first["errno"], parent
    raise error


def _newest_complete(parent: str) -> str | None:
    try:
        found = sorted((int(m.group(1)), d) for d in os.listdir(parent) if (m := _STEP.match(d)))
    except OSError:
        return None
    complete = [os.path.join(parent, d) for _, d in found if is_complete(os.path.join(parent, d))]
    return complete[-1] if complete else None


def check_writable(directory: str) -> None:
    """Create ``directory`` if needed and a probe file in it (``os.access`` says yes to root on a read-only
    mount); a ``ValueError`` naming the directory, the cause and the fix if that fails."""
    probe = os.path.join(directory, f".tp_trainer-write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as err:
        cause, fix = storage_fault(directory, err.errno) or (f"{directory} cannot be written", "fix its cause")
        raise ValueError(f"output_dir {directory!r} is not usable ({type(err).__name__}: {err}): {cause}. "
                         f"Fix: {fix}") from err


def _finish_on_rank0(tmp, final, per_rank, *, model, optimizer, ctx, zero_stage, save_dtype, extras,
                     save_only_model) -> None:
    """Rank 0: the shared files, the manifest (last, with every file's checksum), then the rename."""
    all_files, all_pieces = {}, {}
    for rank_files, rank_pieces in per_rank:
        all_files.update(rank_files)
        for pname, plist in rank_pieces.items():
            all_pieces.setdefault(pname, []).extend(plist)
    if optimizer is not None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        torch.save(groups, os.path.join(tmp, GROUPS))
    if extras is not None:
        extras.write(tmp, save_only_model=save_only_model)
    for fname in sorted(os.listdir(tmp)):
        if fname not in all_files and os.path.isfile(os.path.join(tmp, fname)):
            all_files[fname] = _finish_file(os.path.join(tmp, fname))
    manifest = _manifest(model, ctx, zero_stage, all_files, all_pieces, has_optimizer=bool(all_pieces))
    manifest["model_save_dtype"] = str(save_dtype).removeprefix("torch.")
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    _publish(tmp, final)


def checkpoint_tensors(model):
    """``(parameters, persistent buffers)`` a checkpoint holds, as ``(name, tensor)`` lists. A PEFT model's
    checkpoint holds its trainable parameters only (adapters, ``modules_to_save`` copies): the frozen base
    weights and buffers are the base model's, which the resuming run loads itself."""
    if is_peft_model(model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad], []
    return list(model.named_parameters()), list(persistent_buffers(model))


def _write_rank_files(tmp: str, model, optimizer, ctx) -> tuple[dict, dict]:
    files, pieces = {}, {}
    params, buffers = checkpoint_tensors(model)
    if is_dp_sharded(model):  # ZeRO-3: each local tensor gathered over dp, streamed by dp rank 0 (fully_sharded.py)
        fname = f"model-tp{ctx.tp_rank:02d}-of-{ctx.tp_size:02d}.safetensors"
        if write_dp_sharded_model_file(os.path.join(tmp, fname), params, buffers if ctx.tp_rank == 0 else [], ctx):
            files[fname] = _finish_file(os.path.join(tmp, fname))
    elif ctx.dp_rank == 0:
        tensors = {n: p.detach().contiguous() for n, p in params}
        if ctx.tp_rank == 0:
            tensors.update({n: b.detach().contiguous() for n, b in buffers})
        fname = f"model-tp{ctx.tp_rank:02d}-of-{ctx.tp_size:02d}.safetensors"
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        files[fname] = _finish_file(os.path.join(tmp, fname))
    if optimizer is not None and (not optimizer.state_replicated_over_dp or ctx.dp_rank == 0):
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = {}
        for p, lo, hi, master, state in optimizer.export_state_pieces():
            n = names[id(p)]
            pieces.setdefault(n, []).append([ctx.rank, ctx.tp_rank, lo, hi])
            for key, value in state.items():
                tensors[f"{n}::{key}"] = value.detach().clone()  # views of one flat buffer: safetensors wants copies
            if p.dtype != torch.float32:
                tensors[f"{n}::master"] = master.clone()
        fname = f"optim-rank{ctx.rank:05d}.safetensors"
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        files[fname] = _finish_file(os.path.join(tmp, fname))
    fname = f"rng_state_{ctx.rank}.pth"
    torch.save(_rng_states(), os.path.join(tmp, fname))
    files[fname] = _finish_file(os.path.join(tmp, fname))
    return files, pieces


def _manifest(model, ctx, zero_stage, files, pieces, *, has_optimizer: bool) -> dict:
    tensors = {}
    params, buffers = checkpoint_tensors(model)
    for n, p in params:
        tensors[n] = {"kind": "param", "dtype": str(p.dtype).removeprefix("torch."), "full_shape": _full_shape(p),
                      "shard": _spec_record(getattr(p, "tp_spec", None))}
    for n, b in buffers:
        tensors[n] = {"kind": "buffer", "dtype": str(b.dtype).removeprefix("torch."), "full_shape": list(b.shape),
                      "shard": None}
    config = getattr(model, "config", None)
    return {
        "format": FORMAT, "version": VERSION,
        "topology": {"tp_size": ctx.tp_size, "dp_size": ctx.dp_size, "world_size": ctx.world_size,
                     "zero_stage": zero_stage},
        "model": {"class": type(model).__name__, "model_type": getattr(config, "model_type", None)},
        "versions": _versions(),
        "tensors": tensors,
        "trainable_only": is_peft_model(model),  # a LoRA run: adapters only, the base weights are not in it
        "optimizer": {"pieces": pieces} if has_optimizer else None,
        "files": files,
    }


def _publish(tmp: str, final: str) -> None:
    """``rename(tmp, final)``; an existing ``final`` (same step saved again) is moved aside first, and back
    if the rename fails."""
    trash = None
    if os.path.exists(final):
        trash = tmp + ".old"
        os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except BaseException:
        if trash is not None:
            os.rename(trash, final)  # the earlier checkpoint-N stays what it was
        raise
    _fsync(os.path.dirname(final))
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def rotate_checkpoints(run_dir: str, limit: int | None, best: str | None) -> list[str]:
    """Keep ``limit`` complete checkpoints: the newest, ``best`` (counted in the limit, as in the Trainer), then
    the newest others; delete the older complete ones and the incomplete ``checkpoint-N`` directories (never
    resumed from). Only complete checkpoints count towards the limit, so an incomplete directory (a failed
    save) never pushes a complete checkpoint out."""
    if not limit or limit <= 0:
        return []
    found = sorted((int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
                   if (m := _STEP.match(d)) and os.path.isdir(os.path.join(run_dir, d)))
    paths = [p for _, p in found]
    complete = [os.path.abspath(p) for p in paths if is_complete(p)]
    keep = {complete[-1]} if complete else set()
    if best:
        keep.add(os.path.abspath(best))
    for p in reversed(complete):  # then the newest complete ones, up to the limit (best counts, as in the Trainer)
        if len(keep) >= limit:
            break
        keep.add(p)
    deleted = []
    for p in paths:
        if os.path.abspath(p) not in keep:
            logger.info(f"Deleting older checkpoint [{p}] due to args.save_total_limit")
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted
