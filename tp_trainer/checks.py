"""Run-time checks that turn silent divergence into a clear error."""

from __future__ import annotations

import torch
import torch.distributed as dist


def batch_fingerprint(inputs: dict) -> torch.Tensor:
    """A float64 vector that differs (with overwhelming probability) when two batches differ."""
    parts = []
    for key in sorted(inputs):
        value = inputs[key]
        if not torch.is_tensor(value):
            continue
        flat = value.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973)
        parts.append(torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                                  flat.sum(), (flat * weights).sum()]))
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)


def check_identical_across_tp(inputs: dict, tp_group, *, device) -> None:
    """Raise if the ranks of ``tp_group`` did not receive the same batch (one all-gather)."""
    if tp_group is None:
        return
    fp = batch_fingerprint(inputs).to(device)
    size = dist.get_world_size(tp_group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([fp.numel()], device=device), group=tp_group)
    if len({int(t) for t in lengths}) > 1:
        raise RuntimeError(
            "tensor-parallel ranks received batches with different keys; every rank of a TP group must get the "
            "identical batch. Check that the dataset, collator and sampler do not depend on the global rank.")
    gathered = [torch.empty_like(fp) for _ in range(size)]
    dist.all_gather(gathered, fp, group=tp_group)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(
            "tensor-parallel ranks received different batches at the first step: the TP shards would train on "
            "inconsistent data. Make the dataset, collator and dataloader deterministic across ranks (same seed, "
            "no rank-dependent randomness in the collator or dataloader workers).")
