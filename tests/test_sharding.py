"""ShardSpec: every layout cuts a full tensor into per-rank pieces that reassemble exactly."""

import pytest
import torch

from tp_trainer.parallel.sharding import block_spec, contiguous_spec


def _roundtrip(make_spec, full, tp):
    specs = [make_spec(r) for r in range(tp)]
    locals_ = [s.shard(full) for s in specs]
    assert all(l.shape == specs[0].local_shape for l in locals_)
    return specs, locals_


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_contiguous_roundtrip(tp, dim):
    full = torch.randn(8, 12)
    specs, locals_ = _roundtrip(lambda r: contiguous_spec(full.shape, dim, r, tp), full, tp)
    assert torch.equal(specs[0].unshard(locals_), full)
    assert torch.equal(torch.cat(locals_, dim=dim), full)  # contiguous = plain chunking
    assert not specs[0].overlaps


def test_contiguous_padding_for_odd_vocab():
    full = torch.randn(7, 3)  # a vocabulary of 7 on 4 ranks: 2 rows each, the last rank holds 1 + 1 pad
    specs, locals_ = _roundtrip(lambda r: contiguous_spec(full.shape, 0, r, 4, pad_to_multiple=True), full, 4)
    assert specs[3].segments[3] == ((6, 1),)
    assert torch.equal(locals_[3][1], torch.zeros(3))
    assert torch.equal(specs[0].unshard(locals_), full)


def test_contiguous_refuses_uneven_without_padding():
    with pytest.raises(ValueError, match="not divisible by tp_size=2"):
        contiguous_spec((7, 3), 0, 0, 2)


def test_fused_blocks_are_split_head_aligned():
    # [q: 4 | k: 2 | v: 2] rows on 2 ranks: each rank holds half of every block
    full = torch.arange(8.0)[:, None].repeat(1, 3)
    specs, locals_ = _roundtrip(lambda r: block_spec(full.shape, 0, r, 2, [(4, 1), (2, 1), (2, 1)]), full, 2)
    assert locals_[0][:, 0].tolist() == [0, 1, 4, 6]
    assert locals_[1][:, 0].tolist() == [2, 3, 5, 7]
    assert torch.equal(specs[0].unshard(locals_), full)


def test_replicated_blocks_overlap_and_scatter_add():
    # Multi-query: q split over 4 ranks, a single k row held by all of them.
    full = torch.arange(5.0)[:, None]
    specs, locals_ = _roundtrip(lambda r: block_spec(full.shape, 0, r, 4, [(4, 1), (1, 4)]), full, 4)
    assert specs[0].overlaps
    assert [l[:, 0].tolist() for l in locals_] == [[0, 4], [1, 4], [2, 4], [3, 4]]
    acc = torch.zeros_like(full)
    for s, l in zip(specs, locals_):
        s.scatter_add_into(acc, l)
    assert acc[4, 0] == 4 * 4  # the shared row is summed once per holder
    assert torch.equal(specs[2].take(acc)[:, 0], torch.tensor([2.0, 16.0]))


def test_block_spec_rejects_unsplittable_blocks():
    with pytest.raises(ValueError, match="cannot be split"):
        block_spec((6, 2), 0, 0, 4, [(6, 1)])
    with pytest.raises(ValueError, match="do not add up"):
        block_spec((6, 2), 0, 0, 2, [(4, 1)])
