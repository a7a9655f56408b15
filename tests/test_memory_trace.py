"""``LiveTensorBytes`` against torch's own allocator record: the peak of a real CPU training step.

The memory estimate and the benchmark's measured peak both count with ``LiveTensorBytes`` (a
dispatcher-level view: storages created by ops until freed). Here it is checked once against an
independent source, ``torch.profiler``'s memory timeline, built from the CPU allocator's own
allocation and free events: for the same step both must give the same peak of bytes allocated
on top of what existed before. They may differ by allocations that never become tensors
(kernel workspaces), which are absent from a CPU step of this model: the bound is 1%.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.models import tiny_model
from tp_trainer.memory_trace import LiveTensorBytes


def _profiler_peak(fn) -> int:
    """Peak bytes allocated by ``fn`` beyond what existed before, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        timeline = prof._memory_profile().timeline
    current = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


@pytest.mark.cpu_only(reason="checked against the CPU allocator's record of a CPU step")
def test_peak_of_a_training_step_matches_the_allocator_record():
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # Adam states exist from here on
    expected = _profiler_peak(step)
    with LiveTensorBytes() as live:
        step()
    assert expected > 1_000_000  # activations, gradients: a real step's worth
    assert abs(live.peak - expected) <= 0.01 * expected, (live.peak, expected)
    assert live.current == 0  # everything the step made is freed again (grads set to None)


def test_views_and_in_place_ops_allocate_nothing():
    x = torch.ones(1000)
    with LiveTensorBytes() as live:
        y = x.view(10, 100).t()
        y.mul_(2)
        z = x + 1
        assert live.current == z.untyped_storage().nbytes() == 4000
        del z
        x.add_(1)  # any op releases what died before it
        assert live.current == 0
    assert live.peak == 4000 and y.shape == (100, 10)


def test_a_buffer_emptied_in_place_counts_at_its_new_size():
    # collectives.free_now empties communication buffers that a gloo work object may still hold (here:
    # `held`); their memory is back with the allocator, so they stop counting at the next op
    from tp_trainer.parallel.collectives import free_now

    x = torch.ones(1000)
    with LiveTensorBytes() as live:
        flat = x * 2
        held = [flat[500:]]  # a view, as gloo's work holds the tensors it was given
        free_now(flat)
        del flat
        x.add_(1)
        assert live.current == 0
    assert live.peak == 4000 and held[0].untyped_storage().nbytes() == 0


def test_the_vocab_parallel_softmax_keeps_no_fp32_copy_of_its_input():
    # off CUDA torch.softmax(bf16, dtype=float32) converts the whole input first: a transient as large as the
    # result, which set the peak of long-sequence steps; softmax_fp32 converts 16 MiB of rows at a time
    from tp_trainer.parallel.cross_entropy import SOFTMAX_CHUNK_BYTES, softmax_fp32

    x = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 32 MiB in fp32
    result_bytes = x.numel() * 4
    with LiveTensorBytes() as whole:
        expected = torch.softmax(x, dim=-1, dtype=torch.float32)
    with LiveTensorBytes() as chunked:
        got = softmax_fp32(x)
    assert torch.equal(got, expected)  # the same kernel on the same rows
    assert whole.peak == 2 * result_bytes
    assert chunked.peak <= result_bytes + SOFTMAX_CHUNK_BYTES < whole.peak
