"""A ZeRO-3-like baseline for the layout experiment: torch FSDP2 ``fully_shard`` where accelerate offers none.

accelerate only turns ``--fsdp`` into FSDP on accelerator devices; on a multi-process CPU world
(gloo) it silently falls back to DDP. :class:`FSDPBaselineTrainer` applies FSDP2 itself: every
decoder layer and then the root module become ``fully_shard`` units over the whole world, so each
rank stores ``1/world`` of every parameter, gradient and optimizer state (ZeRO-3). Per layer,
forward and backward all-gather the parameters and backward reduce-scatters (averages) the
gradients -- the communication the seed contrasts TP + ZeRO-1/2 with.

The Trainer's own DDP wrapping is skipped (the model is already sharded); gradient clipping works
on the DTensor gradients (``clip_grad_norm_`` returns the global norm); ``save_model`` gathers a
full state dict to rank 0 (``get_model_state_dict(full_state_dict=True)``) and writes an
ordinary HF directory. On CUDA the plain Trainer's accelerate FSDP path is used instead.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from transformers import Trainer


def needs_fsdp_baseline(args) -> bool:
    """``--fsdp`` asked for on a multi-process world that accelerate would run as DDP (no CUDA)."""
    return bool(args.fsdp) and args.world_size > 1 and not torch.cuda.is_available()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks (the largest ``ModuleList``): each becomes one FSDP unit."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers to shard with FSDP")
    return list(max(lists, key=len))


class FSDPBaselineTrainer(Trainer):
    def __init__(self, model=None, args=None, *pos, **kwargs):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        super().__init__(model, args, *pos, **kwargs)
        prepare = self.accelerator.prepare_model
        # evaluation_mode=True: device placement and mixed precision only, no DDP around the FSDP model
        self.accelerator.prepare_model = lambda m, device_placement=None, evaluation_mode=False: prepare(
            m, device_placement=device_placement, evaluation_mode=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        output_dir = output_dir or self.args.output_dir
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=full)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        dist.barrier()
