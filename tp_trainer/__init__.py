"""tp_trainer: automatic tensor parallelism + ZeRO-1/2/3 data parallelism behind ``transformers.Trainer``."""

__version__ = "0.1.0"


def _configure_logging() -> None:
    """The ``tp_trainer`` logger: its own ``[tp_trainer]`` handler, level following transformers' verbosity
    (TPTrainer re-syncs it after the Trainer applies ``log_level``/``log_level_replica``)."""
    import logging as _logging

    from transformers.utils import logging as hf_logging

    root = _logging.getLogger("tp_trainer")
    if not root.handlers:
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("[tp_trainer] %(message)s"))
        root.addHandler(handler)
        root.propagate = False
        root.setLevel(hf_logging.get_verbosity())


_configure_logging()

from .parallel import ParallelContext
from .planner import Plan, PlanError, apply_tensor_parallel, plan_tensor_parallel

__all__ = ["ParallelContext", "Plan", "PlanError", "TPArgumentsMixin", "TPTrainer", "TPTrainerMixin",
           "TPTrainingArguments", "apply_tensor_parallel", "from_pretrained", "plan_tensor_parallel"]


_LAZY = {"TPTrainer": "trainer", "TPTrainerMixin": "trainer", "TPTrainingArguments": "args",
         "TPArgumentsMixin": "args", "from_pretrained": "loading"}


def __getattr__(name):  # the Trainer pulls in accelerate/datasets: import it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
