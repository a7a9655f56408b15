"""Peak bytes of the tensors a piece of code allocates, seen from the dispatcher (any device, ``meta`` included).

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that follows every storage an op *creates*
while the mode is active, from the op that returns it until Python frees its last reference:

    live(t) = sum of nbytes of the created storages still referenced after op t
    peak    = max over t of live(t)

An op output counts as created unless the op's schema marks it as an alias of an input (views,
in-place and ``out=`` ops return storage that already exists). A storage resized in place counts
at its new size: ``collectives.free_now`` empties buffers that a gloo work object still references,
and their memory is back with the allocator at once. Storages that existed before
(parameters, optimizer states, communication buffers) are never counted, so ``peak`` is what a
training step needs on top of what it starts with: activations, temporaries, gradients as
backward creates them. It does not see memory an op allocates and frees inside its kernel
(a workspace that never becomes a tensor), nor allocations outside torch.

Why our own: the CPU allocator has no ``max_memory_allocated``; ``torch.profiler``'s memory
timeline (``profile_memory=True``) gives the same peaks on CPU (tests/test_estimate.py checks
that) but is deprecated, costs a full profile, and cannot run on ``meta`` tensors, where
:mod:`tp_trainer.memory` uses this mode to simulate a step of a 7B model without allocating it.
No communication.
"""

from __future__ import annotations

import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: ...``, then ``live.peak`` (and ``live.current``) in bytes."""

    def __init__(self):
        super().__init__()
        # storage pointer -> (weak ref to the storage, weak ref to its Python object, nbytes counted)
        self._live: dict[int, tuple[StorageWeakRef, weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._release_dead()
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) and len(returns) == len(out) else [out]
        for ret, value in zip(returns, outputs):
            if ret.alias_info is not None:  # a view or an in-place/out= result: nothing new
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        self.peak = max(self.peak, self.current)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._live:
            self._live[ref.cdata] = (ref, weakref.ref(storage), storage.nbytes())
            self.current += storage.nbytes()

    def _release_dead(self) -> None:
        """Uncount the storages freed since the last op, and those resized in place. A storage is dead
        when its C++ object is (``StorageWeakRef``); its size is read from its Python object while
        that lives (torch keeps it while Python code holds the storage or a tensor on it; a buffer
        that only a gloo work object still holds may have lost it, and keeps its counted size)."""
        for key, (ref, obj, counted) in list(self._live.items()):
            if ref.expired():
                self.current -= counted
                del self._live[key]
                continue
            storage = obj()
            if storage is not None and storage.nbytes() != counted:
                self.current += storage.nbytes() - counted
                self._live[key] = (ref, obj, storage.nbytes())

    def reset_peak(self) -> None:
        """Forget earlier peaks: ``peak`` restarts from what is live now."""
        self._release_dead()
        self.peak = self.current
