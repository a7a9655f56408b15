"""Sharded, atomic, re-partitionable training checkpoints (``save_steps``, ``resume_from_checkpoint``).

A checkpoint ``checkpoint-N/`` written by a run with ``tp`` x ``dp`` ranks holds::

    tp_checkpoint.json               manifest, written last: topology, per-tensor shard layout,
                                     versions, sha256 + size of every other file
    model-tp{t}-of-{tp}.safetensors  TP rank t's local parameter shards (HF names), written by
                                     the dp-rank-0 process of TP rank t; replicated tensors and
                                     persistent buffers are read from t = 0
    optim-rank{r}.safetensors        rank r's optimizer state pieces, key "NAME::KEY" -> the 1-D
                                     slice [lo, hi) of NAME's flat *local* tensor (ZeRO-1/2: the
                                     rank's partition; ZeRO-0: only dp rank 0 writes); "::master"
                                     holds the fp32 master when the parameter is 16-bit
    optimizer_groups.pt              hyper-parameters of the optimizer's param groups
    rng_state_{r}.pth                per-rank RNG states (python, numpy, torch, accelerator)
    scheduler.pt, scaler.pt, trainer_state.json, training_args.bin, config.json,
    generation_config.json, tokenizer files (rank 0)

Every rank writes its own files in parallel; nothing is gathered to rank 0 but file checksums.

**Re-partitioning.** A piece ``(rank, tp_rank, lo, hi)`` of parameter ``NAME`` is placed in the
flat local tensor of the old ``tp_rank``; the old ShardSpec (segments recorded in the manifest)
``unshard``s the ``tp`` local tensors into the full HF tensor; the new run's ShardSpec
``shard``s it again and each rank keeps the flat range its own ZeRO partition owns. So a
checkpoint loads at any tp, dp and ZeRO stage, and into a plain ``Trainer`` (tp=1, zero 0).

**Atomicity.** Files go to ``.tmp-checkpoint-N`` (a name neither ``get_last_checkpoint`` nor
rotation matches), are fsynced, the manifest is written last, and the directory is renamed to
``checkpoint-N`` in one ``rename``. A save killed at any point leaves the previous checkpoints
as they were; the next save deletes the stale temporary directory. Rotation only counts complete
checkpoints and never deletes the newest complete one nor the best one.

**Validation.** Before anything is modified, every file is checked (existence, size, sha256;
the hashing is split over the ranks) and the model's tensor names and full shapes are compared
with the manifest; an error names the offending file or tensor, on every rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .parallel.gather import _persistent_buffers
from .parallel.sharding import ShardSpec
from .zero import ShardedOptimizer

logger = logging.get_logger(__name__)

MANIFEST = "tp_checkpoint.json"
FORMAT = "tp_trainer-sharded-checkpoint"
VERSION = 1
TMP_PREFIX = ".tmp-"
SCHEDULER, SCALER, TRAINER_STATE, GROUPS = "scheduler.pt", "scaler.pt", "trainer_state.json", "optimizer_groups.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what to do."""


def is_sharded_checkpoint(path) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, MANIFEST))


# ============================================================================ small helpers
def _world(ctx):
    return ctx.world_group if ctx is not None and ctx.world_size > 1 and dist.is_initialized() else None


def _barrier(ctx) -> None:
    if _world(ctx) is not None:
        dist.barrier(group=_world(ctx))


def _all_gather_object(obj, ctx) -> list:
    group = _world(ctx)
    if group is None:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def unwrap_optimizer(optimizer):
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (which shares its state and groups)."""
    while optimizer is not None and not isinstance(optimizer, ShardedOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _finish_file(path: str) -> dict:
    """fsync a freshly written file and return its manifest record."""
    _fsync(path)
    return {"sha256": _sha256(path), "bytes": os.path.getsize(path)}


def _spec_record(spec: ShardSpec | None):
    if spec is None:
        return None
    return {"dim": spec.dim, "local_size": spec.local_size, "segments": [[list(s) for s in r] for r in spec.segments]}


def _spec_from_record(rec, full_shape) -> ShardSpec:
    segments = tuple(tuple((int(s), int(n)) for s, n in r) for r in rec["segments"])
    return ShardSpec(rec["dim"], tuple(full_shape), 0, len(segments), segments, rec["local_size"])


def _full_shape(p: torch.Tensor) -> list[int]:
    spec = getattr(p, "tp_spec", None)
    return list(spec.full_shape) if spec is not None else list(p.shape)


def _versions() -> dict:
    import safetensors
    import transformers

    from . import __version__

    return {"tp_trainer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and "cuda" in states:
        cuda = states["cuda"]  # the Trainer saves all devices' states in distributed runs
        torch.cuda.random.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, (list, tuple)) else cuda)


# ============================================================================ saving
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
    from .export import resolve_save_dtype

    write_checkpoint(final, model=trainer.model, optimizer=trainer.optimizer, ctx=ctx,
                     zero_stage=args.zero_stage, save_only_model=args.save_only_model,
                     save_dtype=resolve_save_dtype(args, trainer.model), extras=_RankZeroExtras(trainer))
    if ctx.rank == 0:
        rotate_checkpoints(run_dir, args.save_total_limit, state.best_model_checkpoint)
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
    """config.json, generation_config.json and the tokenizer, as ``save_pretrained`` writes them."""
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
    """Write ``final`` atomically from every rank (collective); see the module docstring."""
    parent, name = os.path.split(os.path.abspath(final))
    tmp = os.path.join(parent, TMP_PREFIX + name)
    if ctx.rank == 0:
        os.makedirs(parent, exist_ok=True)
        for stale in os.listdir(parent):  # leftovers of killed saves: never complete, never resumed from
            if stale.startswith(TMP_PREFIX + PREFIX_CHECKPOINT_DIR) or stale == TMP_PREFIX + name:
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        os.makedirs(tmp)
    _barrier(ctx)
    optimizer = None if save_only_model else unwrap_optimizer(optimizer)
    # A rank that fails (disk full, ...) reports instead of leaving the others blocked in a collective.
    gathered = _all_gather_object(_attempt(_write_rank_files, tmp, model, optimizer, ctx), ctx)
    _raise_if_failed(gathered, final)
    outcome = None
    if ctx.rank == 0:
        outcome = _attempt(_finish_on_rank0, tmp, final, [g[0] for g in gathered], model=model, optimizer=optimizer,
                           ctx=ctx, zero_stage=zero_stage, save_dtype=save_dtype, extras=extras,
                           save_only_model=save_only_model)
    _raise_if_failed(_all_gather_object(outcome, ctx), final)


def _attempt(fn, *args, **kwargs) -> tuple:
    """``(result, None)`` or ``(None, "ExceptionType: message")``."""
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # reported to every rank by the caller
        return None, f"{type(err).__name__}: {err}"


def _raise_if_failed(outcomes: list, final: str) -> None:
    failed = [f"rank {r}: {o[1]}" for r, o in enumerate(outcomes) if o is not None and o[1] is not None]
    if failed:
        raise RuntimeError(f"saving {final} failed ({'; '.join(failed)}); it was not written and the earlier "
                           "checkpoints are intact")


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


def _write_rank_files(tmp: str, model, optimizer, ctx) -> tuple[dict, dict]:
    files, pieces = {}, {}
    if ctx.dp_rank == 0:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        if ctx.tp_rank == 0:
            tensors.update({n: b.detach().contiguous() for n, b in _persistent_buffers(model)})
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
    for n, p in model.named_parameters():
        tensors[n] = {"kind": "param", "dtype": str(p.dtype).removeprefix("torch."), "full_shape": _full_shape(p),
                      "shard": _spec_record(getattr(p, "tp_spec", None))}
    for n, b in _persistent_buffers(model):
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
        "optimizer": {"pieces": pieces} if has_optimizer else None,
        "files": files,
    }


def _publish(tmp: str, final: str) -> None:
    """``rename(tmp, final)``; an existing ``final`` (same step saved again) is moved aside first."""
    trash = None
    if os.path.exists(final):
        trash = tmp + ".old"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync(os.path.dirname(final))
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ============================================================================ rotation
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete(path: str) -> bool:
    """A tp_trainer checkpoint with its manifest, or a Trainer checkpoint with its trainer state."""
    return os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, TRAINER_STATE))


def rotate_checkpoints(run_dir: str, limit: int | None, best: str | None) -> list[str]:
    """Delete the oldest checkpoints beyond ``limit``; keeps the newest complete one and ``best``."""
    if not limit or limit <= 0:
        return []
    found = sorted((int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
                   if (m := _STEP.match(d)) and os.path.isdir(os.path.join(run_dir, d)))
    paths = [p for _, p in found]
    complete = [p for p in paths if is_complete(p)]
    protected = {complete[-1]} if complete else set()
    if best:
        protected.add(os.path.abspath(best))
    protected = {os.path.abspath(p) for p in protected}
    deleted, remaining = [], len(paths)
    for p in paths:
        if remaining <= max(limit, len(protected)):
            break
        if os.path.abspath(p) not in protected:
            logger.info(f"Deleting older checkpoint [{p}] due to args.save_total_limit")
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
            remaining -= 1
    return deleted


# ============================================================================ reading
class CheckpointReader:
    """Full (unsharded) tensors of a sharded checkpoint, read lazily one tensor at a time."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self.topology = manifest["topology"]
        self.tensors = manifest["tensors"]
        self.pieces = (manifest.get("optimizer") or {}).get("pieces", {})
        self._handles = {}

    @classmethod
    def open(cls, path: str, *, model=None, ctx=None, check_files: bool = True) -> "CheckpointReader":
        """Validate ``path`` (manifest, files, model compatibility) and return a reader.

        Collective when ``ctx`` has several ranks: the checksums are split over the ranks and
        every rank raises the same :class:`CheckpointError` if any check fails.
        """
        errors, manifest = [], None
        try:
            manifest = _read_manifest(path)
            if check_files:
                errors += _check_files(path, manifest, ctx)
            if model is not None:
                errors += _check_model(path, manifest, model)
        except CheckpointError as err:
            errors.append(str(err))
        all_errors = [e for rank_errors in _all_gather_object(errors, ctx) for e in rank_errors]
        if all_errors:
            unique = list(dict.fromkeys(all_errors))
            raise CheckpointError("cannot load checkpoint: " + "; ".join(unique[:5]) +
                                  (f" (and {len(unique) - 5} more)" if len(unique) > 5 else ""))
        return cls(path, manifest)

    def _file(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt", device="cpu")
        return self._handles[fname]

    def _spec(self, name: str) -> ShardSpec | None:
        info = self.tensors[name]
        return _spec_from_record(info["shard"], info["full_shape"]) if info["shard"] else None

    def full_tensor(self, name: str) -> torch.Tensor:
        """The full model tensor ``name`` (parameter or buffer) in its saved dtype."""
        tp = self.topology["tp_size"]
        spec = self._spec(name)
        if spec is None:
            return self._file(f"model-tp00-of-{tp:02d}.safetensors").get_tensor(name)
        return spec.unshard([self._file(f"model-tp{t:02d}-of-{tp:02d}.safetensors").get_tensor(name)
                             for t in range(tp)])

    def state_keys(self, name: str) -> list[str]:
        """Optimizer state keys saved for ``name`` (``master`` included when saved)."""
        if name not in self.pieces:
            return []
        rank = self.pieces[name][0][0]
        prefix = f"{name}::"
        return [k[len(prefix):] for k in self._file(f"optim-rank{rank:05d}.safetensors").keys() if k.startswith(prefix)]

    def full_state(self, name: str, key: str) -> torch.Tensor:
        """Optimizer state ``key`` of parameter ``name`` in full HF coordinates (0-dim as saved)."""
        pieces = self.pieces[name]
        first = self._file(f"optim-rank{pieces[0][0]:05d}.safetensors").get_tensor(f"{name}::{key}")
        if first.dim() == 0:
            return first
        info = self.tensors[name]
        spec = self._spec(name)
        local_shape = list(info["full_shape"])
        if spec is not None:
            local_shape[spec.dim] = spec.local_size
        locals_ = []
        for t in range(spec.tp_size if spec is not None else 1):
            flat = torch.zeros(math.prod(local_shape), dtype=first.dtype)
            for rank, tp_rank, lo, hi in pieces:
                if tp_rank == t:
                    flat[lo:hi] = self._file(f"optim-rank{rank:05d}.safetensors").get_tensor(f"{name}::{key}")
            locals_.append(flat.view(local_shape))
        return spec.unshard(locals_) if spec is not None else locals_[0]


    def param_groups(self) -> tuple[list[dict], str]:
        """The optimizer's param-group hyper-parameters (no params) and the file they come from."""
        groups_file = os.path.join(self.path, GROUPS)
        return torch.load(groups_file, weights_only=True), groups_file


class HFCheckpointReader:
    """The same reading interface over a checkpoint of the plain ``Trainer`` (tp=1, zero 0).

    ``model.safetensors`` (or its index) holds full tensors by name; ``optimizer.pt`` is a torch
    optimizer state dict whose integer parameter ids follow the Trainer's param-group order,
    i.e. ``param_names`` (the trained parameters in optimizer order, which every layout shares).
    """

    def __init__(self, path: str, param_names: list[str]):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_file = json.load(f)["weight_map"]
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.isfile(single):
                raise CheckpointError(f"{path} holds neither {MANIFEST} nor model.safetensors(.index.json): "
                                      "not a tp_trainer or Trainer checkpoint")
            with safe_open(single, framework="pt") as f:
                self.weight_file = {k: "model.safetensors" for k in f.keys()}
        self.param_names = param_names
        self.optim_file = os.path.join(path, "optimizer.pt")
        self.pieces = os.path.isfile(self.optim_file)
        self._optim = None
        self._handles = {}

    def check_model(self, model) -> list[str]:
        errors = []
        for name, p in list(model.named_parameters()) + list(_persistent_buffers(model)):
            if name not in self.weight_file:
                errors.append(f"{self.path} has no tensor {name}: it is a checkpoint of a different model")
                continue
            with safe_open(os.path.join(self.path, self.weight_file[name]), framework="pt") as f:
                shape = list(f.get_slice(name).get_shape())
            if shape != _full_shape(p):
                errors.append(f"{self.weight_file[name]} in {self.path}: {name} has shape {shape}, this model "
                              f"{_full_shape(p)}: a checkpoint of a different model")
        return errors

    def full_tensor(self, name: str) -> torch.Tensor:
        fname = self.weight_file[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt", device="cpu")
        return self._handles[fname].get_tensor(name)

    def _optimizer(self) -> dict:
        if self._optim is None:
            self._optim = torch.load(self.optim_file, map_location="cpu", weights_only=True)
            n_saved = sum(len(g["params"]) for g in self._optim["param_groups"])
            if n_saved != len(self.param_names):
                raise CheckpointError(f"{self.optim_file} holds state for {n_saved} parameters, this optimizer "
                                      f"trains {len(self.param_names)}: a different model or optimizer setup")
            order = [i for g in self._optim["param_groups"] for i in g["params"]]
            self._index = {name: i for name, i in zip(self.param_names, order)}
        return self._optim

    def state_keys(self, name: str) -> list[str]:
        return list(self._optimizer()["state"].get(self._index[name], {}))

    def full_state(self, name: str, key: str) -> torch.Tensor:
        return self._optimizer()["state"][self._index[name]][key]

    def param_groups(self) -> tuple[list[dict], str]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self._optimizer()["param_groups"]], \
            self.optim_file


def open_trainer_checkpoint(path: str, *, model, optimizer=None, ctx=None) -> HFCheckpointReader:
    """Validate a plain Trainer checkpoint against ``model`` (all ranks raise together) and return a reader."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = unwrap_optimizer(optimizer)
    if isinstance(opt, ShardedOptimizer):
        order = [names[id(p)] for p in opt.params]
    elif opt is not None:
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    else:
        order = [n for n, p in model.named_parameters() if p.requires_grad]
    errors, reader = [], None
    try:
        reader = HFCheckpointReader(path, order)
        errors = reader.check_model(model)
    except CheckpointError as err:
        errors = [str(err)]
    all_errors = list(dict.fromkeys(e for rank_errors in _all_gather_object(errors, ctx) for e in rank_errors))
    if all_errors:
        raise CheckpointError("cannot load checkpoint: " + "; ".join(all_errors[:5]))
    return reader


def load_trainer_rng_state(path: str, *, tp: int, rank: int) -> str | None:
    """RNG states of a plain Trainer checkpoint: new TP group ``d`` takes old (dp-only) rank ``d``'s."""
    dp_rank = rank // tp
    candidates = [f"rng_state_{dp_rank}.pth"] + (["rng_state.pth"] if dp_rank == 0 else [])
    for fname in candidates:
        fpath = os.path.join(path, fname)
        if os.path.isfile(fpath):
            from transformers.trainer_pt_utils import safe_globals

            with safe_globals():
                _set_rng_states(torch.load(fpath, weights_only=True))
            return fpath
    return None


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{mpath} is missing: {path} is not a complete tp_trainer checkpoint (an interrupted "
                              "save never gets one); resume from an earlier checkpoint-N")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{mpath} is corrupted ({err}); resume from an earlier checkpoint") from None
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mpath} is not a {FORMAT} manifest of version <= {VERSION} "
                              f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def _check_files(path: str, manifest: dict, ctx) -> list[str]:
    """Existence and size of every file on every rank; sha256 of this rank's share of the files."""
    errors = []
    rank, world = (ctx.rank, ctx.world_size) if _world(ctx) is not None else (0, 1)
    for i, (fname, rec) in enumerate(sorted(manifest["files"].items())):
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            errors.append(f"{fpath} is missing (written by another rank? copy the whole checkpoint directory)")
        elif os.path.getsize(fpath) != rec["bytes"]:
            errors.append(f"{fpath} is truncated or altered: {os.path.getsize(fpath)} bytes, the manifest says "
                          f"{rec['bytes']}")
        elif i % world == rank and _sha256(fpath) != rec["sha256"]:
            errors.append(f"{fpath} is corrupted: its sha256 differs from the one in {MANIFEST}")
    return errors


def _check_model(path: str, manifest: dict, model) -> list[str]:
    saved = manifest["tensors"]
    current = {n: ("param", _full_shape(p)) for n, p in model.named_parameters()}
    current.update({n: ("buffer", list(b.shape)) for n, b in _persistent_buffers(model)})
    where = os.path.join(path, MANIFEST)
    errors = []
    missing = [n for n in current if n not in saved]
    unexpected = [n for n in saved if n not in current]
    if missing or unexpected:
        errors.append(f"{where} describes a different model ({manifest['model'].get('class')}): "
                      f"tensors missing from the checkpoint {missing[:4]}, unknown to this model {unexpected[:4]}")
    for n, (kind, shape) in current.items():
        if n in saved and list(saved[n]["full_shape"]) != shape:
            errors.append(f"{where} describes a different model: {n} has shape {saved[n]['full_shape']} in the "
                          f"checkpoint but {shape} in this model")
    return errors


# ============================================================================ loading
@torch.no_grad()
def load_model_weights(reader: CheckpointReader, model) -> None:
    """Copy the checkpoint's weights into ``model``, re-sharded with ``model``'s own ShardSpecs."""
    for name, p in model.named_parameters():
        full = reader.full_tensor(name)
        spec = getattr(p, "tp_spec", None)
        p.data.copy_(spec.shard(full) if spec is not None else full)
    for name, b in _persistent_buffers(model):
        b.copy_(reader.full_tensor(name))


def refresh_master_weights(optimizer) -> None:
    """Copy the model weights into a ShardedOptimizer's fp32 masters; its moments are kept."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, ShardedOptimizer):
        return
    kept = {(id(p), lo): dict(state) for p, lo, hi, _, state in opt.export_state_pieces()}
    opt.import_state_pieces(lambda p, lo, hi: (None, kept[(id(p), lo)]))


def _local_flat(full: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """This rank's flat local tensor of a full state tensor (0-dim states pass through)."""
    if full.dim() == 0:
        return full
    return (spec.shard(full) if spec is not None else full).reshape(-1)


@torch.no_grad()
def load_optimizer_state(reader: CheckpointReader, model, optimizer) -> None:
    """Re-partition the saved optimizer state into ``optimizer`` (ShardedOptimizer or a plain one)."""
    if not reader.pieces and isinstance(reader, HFCheckpointReader):
        logger.warning(f"{reader.path} has no optimizer.pt: the optimizer starts fresh (as the Trainer does)")
        return
    if not reader.pieces:
        raise CheckpointError(f"{reader.path} holds no optimizer state (saved with save_only_model?): "
                              "resume with ignore_data_skip and a fresh optimizer, or from another checkpoint")
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = unwrap_optimizer(optimizer)

    def local_state(p):
        name = names[id(p)]
        spec = getattr(p, "tp_spec", None)
        state = {k: _local_flat(reader.full_state(name, k), spec) for k in reader.state_keys(name)}
        if "master" not in state and p.dtype != torch.float32:
            weight = reader.full_tensor(name)  # fp32 weights of the old run are the new run's fp32 masters
            if weight.dtype == torch.float32:
                state["master"] = _local_flat(weight, spec)
        return state

    if isinstance(optimizer, ShardedOptimizer):
        def fetch(p, lo, hi):
            state = {k: (v[lo:hi] if v.dim() else v) for k, v in local_state(p).items()}
            master = state.pop("master", None)
            return (master.float() if master is not None else None), state
        optimizer.import_state_pieces(fetch)
    else:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = local_state(p)
                master = state.pop("master", None)
                if master is not None:
                    p.data.copy_(master.view_as(p))
                optimizer.state[p] = {k: (v.view_as(p) if v.dim() else v).clone().to(p.device)
                                      for k, v in state.items()}
    saved, groups_file = reader.param_groups()
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"{groups_file} has {len(saved)} optimizer param groups, this optimizer has "
                              f"{len(optimizer.param_groups)}: was it built the same way (optim, weight decay)?")
    for group, hyper in zip(optimizer.param_groups, saved):
        for key, value in hyper.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def load_scheduler(path: str, scheduler) -> None:
    """The LR scheduler state (topology-independent; the grad scaler is loaded by the Trainer itself)."""
    sched = os.path.join(path, SCHEDULER)
    if scheduler is not None and os.path.isfile(sched):
        scheduler.load_state_dict(torch.load(sched, weights_only=True))


def load_rng_state(path: str, manifest: dict, *, tp: int, dp: int, rank: int) -> str | None:
    """Restore this rank's RNG states; returns the file used (None when the old run had no match).

    Same topology: ``rng_state_{rank}``. Another topology: every rank of new TP group ``d`` takes
    the states of old TP group ``d``'s first rank, so a TP group keeps drawing identical numbers;
    new dp replicas beyond the old dp size keep their seeded states.
    """
    topo = manifest["topology"]
    dp_rank = rank // tp
    if (topo["tp_size"], topo["dp_size"]) == (tp, dp):
        old = rank
    elif dp_rank < topo["dp_size"]:
        old = dp_rank * topo["tp_size"]
    else:
        logger.info(f"rank {rank}: no dp replica {dp_rank} in the checkpoint's layout; RNG states stay as seeded")
        return None
    fname = os.path.join(path, f"rng_state_{old}.pth")
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        _set_rng_states(torch.load(fname, weights_only=True))
    return fname


def restore_rng_state(path: str, *, tp: int, dp: int, rank: int) -> str | None:
    """This rank's RNG states from a sharded or a plain Trainer checkpoint (see the two loaders)."""
    if is_sharded_checkpoint(path):
        return load_rng_state(path, _read_manifest(path), tp=tp, dp=dp, rank=rank)
    return load_trainer_rng_state(path, tp=tp, rank=rank)
