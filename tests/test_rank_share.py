"""scripts/rank_share.py: its "share" model is exactly the work of our tp=2 rank, and both step.

The script's claim (``share / (full / 2)`` is the best ``tp2 / (single / 2)`` any TP implementation
can reach) rests on the share model holding what one tp=2 rank holds: half the heads, KV heads,
MLP and vocabulary, and every replicated norm. Checked here against tp_trainer's own rank 0 of
the same config (parameter shapes as a multiset, so a share that kept the full MLP or vocabulary
fails), on a tiny Llama; then one training step of each, which must give a finite time.
No timing assertions.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.cpu_only(reason="scripts/rank_share.py times a CPU share model (CPU attention, one process)")


@pytest.fixture(scope="module")
def rank_share():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("rank_share", os.path.join(ROOT, "scripts", "rank_share.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
        sys.modules.pop("bench", None)


def test_share_model_holds_exactly_what_our_tp2_rank_holds(rank_share, tmp_path):
    bench = rank_share.bench
    cfg = bench.BenchConfig(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256, batch=2, seq=32)
    # as rank_share.main: our rank 0 shards the directory the full model was written to
    full = rank_share._stepper(cfg, torch.float32, str(tmp_path / "full"), share=False, compiled=False)
    share = rank_share._stepper(cfg, torch.float32, str(tmp_path / "share"), share=True, compiled=False)
    ours = rank_share._our_rank_stepper(cfg, torch.float32, str(tmp_path / "full"))

    def shapes(model):
        return collections.Counter(tuple(p.shape) for p in model.parameters())

    assert shapes(share.model) == shapes(ours.model)
    n_full, n_share = (sum(p.numel() for p in m.parameters()) for m in (full.model, share.model))
    norms = (2 * cfg.layers + 1) * cfg.hidden  # replicated on every rank: the share keeps them whole
    assert n_share == (n_full - norms) // 2 + norms
    for step in (full, share, ours):
        assert math.isfinite(step(0)) and step(1) > 0
