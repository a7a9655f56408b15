"""Which kernels and transports a run uses beyond stock PyTorch and transformers, decided in one place.

Every choice below was measured on CPU training (gloo ranks, the 2-core benchmark machine; the
figures are in docs/benchmarks.md, "Kernel measurements") and none on a GPU, so on CUDA (NCCL)
every one is off. :func:`choose_kernels` is the decision table, a pure function of the device,
the backend and the user's ``cpu_kernels`` flag (``--cpu_kernels auto|off``):

=======================  ==============================  ==========================================
choice                   on when                         module
=======================  ==============================  ==========================================
``shm_all_reduce``       CPU, gloo                       ``shm.py``: the TP group's all-reduces and
                                                         all-gathers through ``/dev/shm``
``cpu_attention``        CPU                             ``attention.py``: causal attention as
                                                         batched GEMMs over row blocks
``token_split_norms``    CPU, gloo, with the shm         ``norms.py``: 16-bit replicated norms on
                         transport                       ``1/tp`` of the tokens per rank
``malloc_tuning``        CPU                             ``host.py``: freed activations stay in the heap
``lean_activations``     every device, also with         ``rmsnorm.py``, ``glu.py``,
                         ``cpu_kernels="off"``           ``linear_cross_entropy.py``: RMSNorms, gated
                                                         MLPs and the LM head + loss keep less for
                                                         backward
=======================  ==============================  ==========================================

``cpu_kernels="off"`` turns the CPU choices off: the run uses the stock modules and gloo's own
collectives (the fallback, and the way to rule them out when something looks wrong). The
environment overrides ``TP_TRAINER_SHM_ALLREDUCE=0``, ``TP_TRAINER_CPU_ATTENTION=0``,
``TP_TRAINER_CPU_MALLOC=0`` and ``TP_TRAINER_LEAN_ACTIVATIONS=0`` turn one choice off each (the
shared-memory one takes the token-split norms with it); they are read here and nowhere else.

``lean_activations`` is not a CPU kernel but a memory choice: the same forward values (each module is
checked bit for bit before it is changed), fewer saved activations, a few elementwise passes
recomputed in backward; what it keeps per token is in ``tp_trainer/memory_theory.py``.

:class:`~tp_trainer.parallel.context.ParallelContext` computes the decision once, then records
what the machine granted: the shared-memory transport needs every TP rank on one x86-64 host
(``shm.maybe_shared_memory_all_reduce``), the allocator setting needs glibc. Every other module
reads ``context.kernels``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import torch

CPU_KERNELS_CHOICES = ("auto", "off")
# environment variable -> the choices it turns off when set to "0"
ENV_OVERRIDES = {"TP_TRAINER_SHM_ALLREDUCE": ("shm_all_reduce", "token_split_norms"),
                 "TP_TRAINER_CPU_ATTENTION": ("cpu_attention",),
                 "TP_TRAINER_CPU_MALLOC": ("malloc_tuning",),
                 "TP_TRAINER_LEAN_ACTIVATIONS": ("lean_activations",)}
_LABELS = {"shm_all_reduce": "shm all-reduce", "cpu_attention": "cpu attention",
           "token_split_norms": "token-split norms", "malloc_tuning": "malloc tuning"}
_SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Kernels:
    """The kernel and transport choices of one process (see the module docstring for each)."""

    shm_all_reduce: bool = False     # TP all-reduce / all-gather through shared memory
    cpu_attention: bool = False      # causal self-attention by CPU row blocks
    token_split_norms: bool = False  # 16-bit replicated norms on 1/tp of the tokens (needs shm_all_reduce)
    malloc_tuning: bool = False      # glibc keeps freed activation memory in the heap
    lean_activations: bool = True    # RMSNorms, gated MLPs, LM head + loss keep less for backward (any device)
    cpu_kernels: str = "auto"        # the user's flag this came from
    device_type: str = "cpu"         # the device it was decided for

    def granted(self, *, shm_all_reduce: bool | None = None, malloc_tuning: bool | None = None) -> "Kernels":
        """This decision, less what the machine could not give: no shared-memory transport (ranks on
        several hosts, no ``/dev/shm``, tp=1: no TP group) also means no token-split norms."""
        shm = self.shm_all_reduce if shm_all_reduce is None else self.shm_all_reduce and shm_all_reduce
        malloc = self.malloc_tuning if malloc_tuning is None else self.malloc_tuning and malloc_tuning
        return replace(self, shm_all_reduce=shm, token_split_norms=self.token_split_norms and shm,
                       malloc_tuning=malloc)

    def splits_norms(self, dtype: torch.dtype) -> bool:
        """Whether replicated per-token norms whose parameters are ``dtype`` run on ``1/tp`` of the tokens.

        Only 16-bit ones: one all-gather forward and one backward against half the norm's work, and a
        16-bit norm upcasts to fp32 inside, so it does about twice the work per byte gathered of an
        fp32 one: the split measured faster for bf16 norms and slower for fp32 ones (docs/benchmarks.md, "Kernel measurements").
        """
        return self.token_split_norms and torch.empty((), dtype=dtype).element_size() == 2

    def describe(self, dtype: torch.dtype | None = None) -> str:
        """One line: ``kernels: shm all-reduce, cpu attention, ...`` or ``kernels: none (...)``, then
        ``; lean activations`` where they are on. With the model's ``dtype`` the token-split norms are
        named only where they apply (16-bit)."""
        lean = "; lean activations" if self.lean_activations else ""
        return self._describe_cpu(dtype) + lean

    def _describe_cpu(self, dtype: torch.dtype | None) -> str:
        names = []
        for f in fields(self):
            if f.name not in _LABELS or not getattr(self, f.name):
                continue
            label = _LABELS[f.name]
            if f.name == "token_split_norms":
                if dtype is not None and not self.splits_norms(dtype):
                    continue
                label += f" ({_SHORT_DTYPE.get(dtype, dtype) if dtype is not None else '16-bit'})"
            names.append(label)
        if names:
            return "kernels: " + ", ".join(names)
        if self.cpu_kernels == "off":
            return "kernels: none (cpu_kernels=off)"
        if self.device_type not in ("cpu", "meta"):
            return f"kernels: none ({self.device_type}: they were measured on CPU only)"
        return "kernels: none (" + ", ".join(f"{v}=0" for v in ENV_OVERRIDES) + " or not granted)"


def check_cpu_kernels(value) -> str:
    """``value`` if it is one of :data:`CPU_KERNELS_CHOICES`, else a ValueError naming the choices."""
    if value not in CPU_KERNELS_CHOICES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(repr(c) for c in CPU_KERNELS_CHOICES)}, got "
                         f"{value!r}: 'auto' uses the CPU kernels and the shared-memory transport where they apply "
                         "(CPU runs), 'off' the stock PyTorch / transformers modules and the backend's collectives")
    return value


def choose_kernels(device: str | torch.device, backend: str, cpu_kernels: str = "auto", *,
                   environ=None) -> Kernels:
    """The decision table of the module docstring: what a process on ``device`` (``"cpu"``, ``"cuda"``;
    ``"meta"`` counts as the CPU it simulates) with ``backend`` would use. ``environ`` (default
    ``os.environ``) supplies the ``TP_TRAINER_*=0`` overrides."""
    check_cpu_kernels(cpu_kernels)
    device_type = torch.device(device).type
    environ = os.environ if environ is None else environ
    if cpu_kernels == "off" or device_type not in ("cpu", "meta"):
        choices = {"lean_activations": True}
    else:
        gloo = backend == "gloo"
        choices = {"shm_all_reduce": gloo, "cpu_attention": True, "token_split_norms": gloo, "malloc_tuning": True,
                   "lean_activations": True}
    for variable, turned_off in ENV_OVERRIDES.items():
        if environ.get(variable, "1") == "0":
            choices.update(dict.fromkeys(turned_off, False))
    return Kernels(**choices, cpu_kernels=cpu_kernels, device_type=device_type)
