"""The main job's application: built-in data and tokenizer, recipes, launch, evaluation, report, FSDP baseline.

Built on the library (``tp_trainer.trainer``, ``tp_trainer.planner``, ...), which never imports it; the
commands (``tp_trainer.commands``) sit on top of it.
"""
