"""The kernel and transport choices (tp_trainer/parallel/kernels.py): the decision table, where it is read, and
that ``cpu_kernels="off"`` gives the stock modules (but the lean activations, a memory choice on every device,
which ``TP_TRAINER_LEAN_ACTIVATIONS=0`` turns off) and the same numbers.

The table is a pure function of (device, backend, ``cpu_kernels``, environment), checked row by row
without a process group. ``off`` at tp=2 is checked on real ranks against the unsharded model
(fp32, same weights; TP only reorders sums, so the tolerance is test_families.py's 2e-5).
"""

import pytest
import torch

from distributed import run_distributed
from models import tiny_model
from tp_trainer.parallel.context import ParallelContext
from tp_trainer.parallel.kernels import Kernels, check_cpu_kernels, choose_kernels
from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel

ALL = ("shm_all_reduce", "cpu_attention", "token_split_norms", "malloc_tuning", "lean_activations")
LEAN = {"lean_activations"}
CPU_ONLY = pytest.mark.cpu_only(reason="the CPU kernels against the stock modules, on gloo ranks")


def _on(kernels: Kernels) -> set[str]:
    return {name for name in ALL if getattr(kernels, name)}


@pytest.mark.parametrize("device, backend, flag, env, expected", [
    ("cpu", "gloo", "auto", {}, set(ALL)),
    ("cpu", "gloo", "off", {}, LEAN),
    ("cuda", "nccl", "auto", {}, LEAN),  # no CPU kernel was measured on GPUs; the memory choice holds anywhere
    ("cuda", "nccl", "off", {}, LEAN),
    ("cuda", "nccl", "auto", {"TP_TRAINER_LEAN_ACTIVATIONS": "0"}, set()),
    ("cpu", "gloo", "off", {"TP_TRAINER_LEAN_ACTIVATIONS": "0"}, set()),
    ("cpu", "gloo", "auto", {"TP_TRAINER_LEAN_ACTIVATIONS": "0"}, set(ALL) - LEAN),
    ("cpu", "mpi", "auto", {}, {"cpu_attention", "malloc_tuning"} | LEAN),  # shm serves gloo only
    ("meta", "gloo", "auto", {}, set(ALL)),  # the estimator's simulated CPU step
    ("cpu", "gloo", "auto", {"TP_TRAINER_SHM_ALLREDUCE": "0"}, {"cpu_attention", "malloc_tuning"} | LEAN),
    ("cpu", "gloo", "auto", {"TP_TRAINER_CPU_ATTENTION": "0"}, set(ALL) - {"cpu_attention"}),
    ("cpu", "gloo", "auto", {"TP_TRAINER_CPU_MALLOC": "0"}, set(ALL) - {"malloc_tuning"}),
    ("cpu", "gloo", "auto", {"TP_TRAINER_CPU_MALLOC": "1"}, set(ALL)),
    ("cuda", "nccl", "auto", {"TP_TRAINER_SHM_ALLREDUCE": "1"}, LEAN),
])
def test_decision_table(device, backend, flag, env, expected):
    kernels = choose_kernels(device, backend, flag, environ=env)
    assert _on(kernels) == expected
    assert kernels.cpu_kernels == flag


def test_what_the_machine_does_not_grant_is_off():
    wanted = choose_kernels("cpu", "gloo", environ={})
    # no shared-memory transport (ranks on two hosts, tp=1): no token-split norms either
    assert _on(wanted.granted(shm_all_reduce=False)) == {"cpu_attention", "malloc_tuning"} | LEAN
    assert _on(wanted.granted(malloc_tuning=False)) == set(ALL) - {"malloc_tuning"}
    assert _on(choose_kernels("cpu", "gloo", "off").granted(shm_all_reduce=True)) == LEAN  # granting adds nothing


def test_only_16_bit_norms_are_split():
    kernels = choose_kernels("cpu", "gloo", environ={})
    assert kernels.splits_norms(torch.bfloat16) and kernels.splits_norms(torch.float16)
    assert not kernels.splits_norms(torch.float32)
    assert not kernels.granted(shm_all_reduce=False).splits_norms(torch.bfloat16)


def test_one_line_description():
    kernels = choose_kernels("cpu", "gloo", environ={})
    assert kernels.describe(torch.bfloat16) == ("kernels: shm all-reduce, cpu attention, token-split norms (bf16), "
                                                "malloc tuning; lean activations")
    assert kernels.describe(torch.float32) == "kernels: shm all-reduce, cpu attention, malloc tuning; lean activations"
    assert choose_kernels("cpu", "gloo", "off").describe() == "kernels: none (cpu_kernels=off); lean activations"
    assert choose_kernels("cuda", "nccl").describe().startswith("kernels: none (cuda")
    assert choose_kernels("cuda", "nccl").describe().endswith("; lean activations")
    lean_off = {"TP_TRAINER_LEAN_ACTIVATIONS": "0"}
    assert choose_kernels("cpu", "gloo", "off", environ=lean_off).describe() == "kernels: none (cpu_kernels=off)"


def test_the_flag_is_validated_with_its_choices():
    assert check_cpu_kernels("off") == "off"
    for bad in ("on", "OFF", None, True):
        with pytest.raises(ValueError, match="cpu_kernels must be one of 'auto', 'off'"):
            choose_kernels("cpu", "gloo", bad)


def test_training_arguments_refuse_an_unknown_cpu_kernels(tmp_path):
    from tp_trainer.args import TPTrainingArguments

    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        TPTrainingArguments(output_dir=str(tmp_path), cpu_kernels="fast")
    assert TPTrainingArguments(output_dir=str(tmp_path), cpu_kernels="off").cpu_kernels == "off"


def test_the_context_holds_the_decision():
    assert _on(ParallelContext().kernels) == {"cpu_attention"} | LEAN  # no TP group, nothing applied
    cuda = ParallelContext(device=torch.device("cuda", 0), backend="nccl")
    assert _on(cuda.kernels) == LEAN


@pytest.mark.parametrize("context, fused", [(ParallelContext(), True),
                                            (ParallelContext(device=torch.device("cuda", 0), backend="nccl"), True),
                                            (ParallelContext(kernels=choose_kernels("cpu", "gloo", "off")), True),
                                            (ParallelContext(kernels=choose_kernels(
                                                "cpu", "gloo", environ={"TP_TRAINER_LEAN_ACTIVATIONS": "0"})), False)])
def test_apply_fuses_rmsnorm_only_where_the_kernels_say(context, fused):
    model = tiny_model("llama")  # on the CPU: at tp=1 apply only decides the norms, for any context
    apply_tensor_parallel(model, plan_tensor_parallel(model, 1), context)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(hasattr(m, "tp_rms_eps") is fused for m in norms)


def _off_suite(dtype_name, lean):
    """tp=2 with cpu_kernels="off": stock modules, gloo's collectives; with ``lean=False`` Hugging Face's own
    norms and MLPs too. One step's loss and gathered gradients."""
    import os

    from tp_trainer.parallel.attention import NAME
    from tp_trainer.parallel.gather import iter_full_state

    os.environ["TP_TRAINER_LEAN_ACTIVATIONS"] = "1" if lean else "0"
    ctx = ParallelContext.from_environment(2, cpu_kernels="off")
    model = tiny_model("llama").to(getattr(torch, dtype_name))
    apply_tensor_parallel(model, plan_tensor_parallel(model, 2), ctx)
    stock = {"transport": ctx.tp_comm.transport is None, "kernels": ctx.kernels.describe(),
             "fused": sum(hasattr(m, "tp_rms_eps") for m in model.modules()),
             "lean_mlps": sum(hasattr(m, "tp_activation") for m in model.modules()),
             "split": sum(getattr(m, "tp_token_split", False) for m in model.modules()),
             "attention": model.config._attn_implementation != NAME}
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: g.float() for name, g in iter_full_state(model, ctx.tp_group, grads=True)}
    return {"stock": stock, "loss": loss.item(), "grads": grads}


@CPU_ONLY
@pytest.mark.parametrize("lean", [False, True])
def test_cpu_kernels_off_gives_the_stock_modules_and_the_unsharded_numbers(lean):
    suffix = "; lean activations" if lean else ""
    for rank in run_distributed(_off_suite, 2, "bfloat16", lean):  # bf16: where the norms would otherwise be split
        # tiny llama: 2 layers -> 5 RMSNorms (2 per layer and the final one), 2 gated MLPs
        assert rank["stock"] == {"transport": True, "kernels": "kernels: none (cpu_kernels=off)" + suffix,
                                 "fused": 5 if lean else 0, "lean_mlps": 2 if lean else 0, "split": 0,
                                 "attention": True}
    ref_model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    ref_loss = ref_model(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    for rank in run_distributed(_off_suite, 2, "float32", lean):
        assert rank["loss"] == pytest.approx(ref_loss.item(), abs=2e-5)
        for name, p in ref_model.named_parameters():
            assert (rank["grads"][name] - p.grad).abs().max().item() < 2e-5, name
