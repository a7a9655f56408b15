"""tp_trainer: automatic tensor parallelism + ZeRO-1/2 data parallelism behind ``transformers.Trainer``."""

__version__ = "0.1.0"

from .parallel import ParallelContext
from .planner import Plan, PlanError, apply_tensor_parallel, plan_tensor_parallel

__all__ = ["ParallelContext", "Plan", "PlanError", "TPTrainer", "TPTrainingArguments", "apply_tensor_parallel",
           "plan_tensor_parallel"]


def __getattr__(name):  # the Trainer pulls in accelerate/datasets: import it only when asked for
    if name == "TPTrainer":
        from .trainer import TPTrainer
        return TPTrainer
    if name == "TPTrainingArguments":
        from .args import TPTrainingArguments
        return TPTrainingArguments
    raise AttributeError(name)
