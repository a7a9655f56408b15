"""The one place that picks device and backend (parallel/context.py) follows the Trainer's --use_cpu."""

import torch

from tp_trainer.parallel.context import default_device_and_backend


def test_cuda_when_present_unless_the_run_asked_for_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device_and_backend() == (torch.device("cuda", 1), "nccl")
    # TPTrainer passes args.use_cpu: a CPU run on a GPU machine must not build an NCCL mesh on cuda
    assert default_device_and_backend(use_cpu=True) == (torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device_and_backend() == (torch.device("cpu"), "gloo")
