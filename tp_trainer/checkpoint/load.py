"""Reading sharded (and plain Trainer) checkpoints: validation first, then re-partitioned loading.

A reader returns *full* tensors (HF layout) one at a time: ``full_tensor(name)`` stitches the
TP shards with the layout recorded in the manifest, ``full_state(name, key)`` places each rank's
optimizer-state slices into its old local tensor and unshards it. Loading shards them again
with the current model's ShardSpecs, and a ShardedOptimizer keeps the flat range it owns.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from transformers.utils import logging

from ..parallel.gather import persistent_buffers
from ..parallel.lora import is_peft_model
from ..parallel.sharding import ShardSpec
from ..zero import ZERO_OPTIMIZERS
from .fully_sharded import copy_into_param_
from .layout import (FORMAT, GROUPS, MANIFEST, SCHEDULER, VERSION, CheckpointError, _all_gather_object, _full_shape,
                     _set_rng_states, _sha256, _spec_from_record, _world, is_sharded_checkpoint, unwrap_optimizer)

logger = logging.get_logger(__name__)


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
        for name, p in list(model.named_parameters()) + list(persistent_buffers(model)):
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
    if isinstance(opt, ZERO_OPTIMIZERS):
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
                          f"{rec['bytes']}; resume from an earlier checkpoint-N (or copy this one again)")
        elif i % world == rank and _sha256(fpath) != rec["sha256"]:
            errors.append(f"{fpath} is corrupted: its sha256 differs from the one in {MANIFEST}; resume from an "
                          "earlier checkpoint-N (or copy this one again)")
    return errors


def _check_model(path: str, manifest: dict, model) -> list[str]:
    saved = manifest["tensors"]
    where = os.path.join(path, MANIFEST)
    trainable_only = bool(manifest.get("trainable_only"))
    if trainable_only != is_peft_model(model):
        return [f"{where} was written by a {'LoRA (PEFT)' if trainable_only else 'full'} training run and holds "
                f"{'only the trainable adapter tensors' if trainable_only else 'every weight'}, but this model is "
                f"{'not ' if trainable_only else ''}a PEFT model: "
                + ("wrap the base model with the run's LoRA config (get_peft_model) before resuming" if trainable_only
                   else "resume it without the PEFT wrapper, or start the LoRA run from the exported model")]
    if trainable_only:
        current = {n: ("param", _full_shape(p)) for n, p in model.named_parameters() if p.requires_grad}
    else:
        current = {n: ("param", _full_shape(p)) for n, p in model.named_parameters()}
        current.update({n: ("buffer", list(b.shape)) for n, b in persistent_buffers(model)})
    errors = []
    missing = [n for n in current if n not in saved]
    unexpected = [n for n in saved if n not in current]
    if missing or unexpected:
        errors.append(f"{where} describes a different model ({manifest['model'].get('class')}): "
                      f"tensors missing from the checkpoint {missing[:4]}, unknown to this model {unexpected[:4]}; "
                      "resume from a checkpoint of this model, or start over (resume_from_checkpoint: none)")
    for n, (kind, shape) in current.items():
        if n in saved and list(saved[n]["full_shape"]) != shape:
            errors.append(f"{where} describes a different model: {n} has shape {saved[n]['full_shape']} in the "
                          f"checkpoint but {shape} in this model; resume from a checkpoint of this model, or start "
                          "over (resume_from_checkpoint: none)")
    return errors


@torch.no_grad()
def load_model_weights(reader: CheckpointReader, model) -> None:
    """Copy the checkpoint's weights into ``model``, re-sharded with ``model``'s own ShardSpecs."""
    trainable_only = bool(getattr(reader, "manifest", {}).get("trainable_only"))
    for name, p in model.named_parameters():
        if trainable_only and name not in reader.tensors:  # a LoRA run's checkpoint: the base stays as loaded
            continue
        full = reader.full_tensor(name)
        spec = getattr(p, "tp_spec", None)
        copy_into_param_(p, spec.shard(full) if spec is not None else full)  # ZeRO-3: this rank's dp rows
    for name, b in ([] if trainable_only else persistent_buffers(model)):
        b.copy_(reader.full_tensor(name))


def refresh_master_weights(optimizer) -> None:
    """Copy the model weights into a ShardedOptimizer's fp32 masters; its moments are kept."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, ZERO_OPTIMIZERS):
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

    if isinstance(optimizer, ZERO_OPTIMIZERS):
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
