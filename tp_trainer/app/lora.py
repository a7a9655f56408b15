"""LoRA in recipes: ``use_lora: true`` and a ``lora:`` block, and the PEFT wrapping of the main job's model.

A recipe asks for LoRA with::

    use_lora: true
    lora:
      r: 16                # rank
      alpha: 32            # scale s = alpha / r
      dropout: 0.05
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]   # or all-linear
      modules_to_save: []  # modules trained in full beside the adapters (e.g. [lm_head])

:func:`flatten_lora_block` turns the block into the flat fields of :class:`LoraSettings` (``lora_r``,
``lora_alpha``, ...), which ``HfArgumentParser`` reads like any other recipe field, so the command line
overrides them too (``--lora_r 8``). Bad values fail when the settings are built, before any model is
loaded. :func:`wrap_with_lora` wraps the model with PEFT (``get_peft_model``) before ``TPTrainer``
plans it: the planner shards the base as without LoRA and slices each adapter like its base layer
(``tp_trainer/planner/lora.py``); ``save_model`` then writes PEFT's adapter directory.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields

BLOCK_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
              "target_modules": "lora_target_modules", "modules_to_save": "lora_modules_to_save"}


@dataclass
class LoraSettings:
    use_lora: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (PEFT) instead of the full model; the base weights are frozen."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r (recipe: lora.r)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the adapter is scaled by alpha / r "
                                                              "(recipe: lora.alpha)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the adapters' input (recipe: lora.dropout)."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names the adapters wrap, or 'all-linear' (every linear but the output "
                "layer) (recipe: lora.target_modules, a list)."})
    lora_modules_to_save: str = field(default="", metadata={
        "help": "Comma-separated modules trained in full beside the adapters, e.g. 'lm_head' "
                "(recipe: lora.modules_to_save, a list)."})

    def __post_init__(self):
        if isinstance(self.lora_target_modules, (list, tuple)):
            self.lora_target_modules = ",".join(self.lora_target_modules)
        if isinstance(self.lora_modules_to_save, (list, tuple)):
            self.lora_modules_to_save = ",".join(self.lora_modules_to_save)
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 1:
            raise ValueError(f"lora_r (lora.r) must be an integer >= 1, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha (lora.alpha) must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout (lora.dropout) must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules():
            raise ValueError("lora_target_modules (lora.target_modules) names no module: give module names such as "
                             "[q_proj, v_proj], or all-linear")

    def target_modules(self) -> list[str] | str:
        names = [n.strip() for n in str(self.lora_target_modules).split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def modules_to_save(self) -> list[str] | None:
        names = [n.strip() for n in str(self.lora_modules_to_save).split(",") if n.strip()]
        return names or None

    def describe(self) -> str:
        return (f"LoRA r={self.lora_r} alpha={self.lora_alpha:g} dropout={self.lora_dropout:g} on "
                f"{self.target_modules()}" + (f", modules_to_save {self.modules_to_save()}"
                                              if self.modules_to_save() else ""))


def flatten_lora_block(recipe: dict) -> dict:
    """``recipe`` with its ``lora:`` block (if any) replaced by the flat ``lora_*`` fields; an unknown key in
    the block, or a block that is not a mapping, is an error naming it."""
    if "lora" not in recipe:
        return dict(recipe)
    block = recipe["lora"]
    if not isinstance(block, dict):
        raise ValueError(f"the recipe's 'lora' entry must be a mapping of {sorted(BLOCK_KEYS)}, got {block!r}")
    out = {k: v for k, v in recipe.items() if k != "lora"}
    for key, value in block.items():
        if key not in BLOCK_KEYS:
            close = difflib.get_close_matches(str(key), list(BLOCK_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r} in the recipe's lora block{hint}; known: {sorted(BLOCK_KEYS)}")
        flat = BLOCK_KEYS[key]
        if flat in out:
            raise ValueError(f"the recipe sets both lora.{key} and {flat}: keep one")
        out[flat] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out


def lora_field_names() -> set[str]:
    return {f.name for f in fields(LoraSettings)}


def lora_config(settings: LoraSettings):
    """PEFT's ``LoraConfig`` for ``settings`` (for TRL's ``peft_config=``), ``None`` without ``use_lora``."""
    if not settings.use_lora:
        return None
    from ..extras import require

    require("peft", feature="use_lora")
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout, target_modules=settings.target_modules(),
                      modules_to_save=settings.modules_to_save())


def wrap_with_lora(model, settings: LoraSettings):
    """``get_peft_model(model, LoraConfig(...))`` for ``settings.use_lora``, else ``model`` unchanged."""
    config = lora_config(settings)
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)
