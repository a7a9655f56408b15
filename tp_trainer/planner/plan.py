"""The sharding plan: a printable value that says, for every parameterised module, how it is split and why.

A plan is computed by :func:`tp_trainer.planner.plan_tensor_parallel` without any process
group and applied by :func:`tp_trainer.planner.apply_tensor_parallel`. It is pure data:

* ``entries``: module name -> :class:`PlanEntry` (style, fused layout, source, reason);
* ``patches``: attention modules whose head counts / split sizes must become per-rank values;
* ``param_counts``: module name -> elements of its own parameters (each tensor counted once), from
  which the plan states the fraction of the model that is sharded and warns about large
  replicated blocks (a replicated block costs its full size on every rank).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class Style(str, enum.Enum):
    COLWISE = "colwise"                      # output dim split, f on the input
    COLWISE_GATHER = "colwise_gather_output"  # ... then all-gather the output
    ROWWISE = "rowwise"                      # input dim split, g on the output, bias after g
    ROWWISE_SPLIT = "rowwise_split_input"    # ... on a replicated input it first splits
    VOCAB_EMBEDDING = "vocab_embedding"      # rows of the vocabulary split
    LM_HEAD = "vocab_lm_head"                # vocabulary split + vocab-parallel cross-entropy
    REPLICATED = "replicated"                # full copy on every rank, identical gradients
    REPLICATED_GRAD_SUM = "replicated_grad_sum"  # full copy fed split activations: grads summed over TP
    HEAD_SHARDED = "head_sharded"            # per-head parameters (dim 0 = heads) split with the heads
    EXPERTS = "experts_tp"                   # fused MoE experts: gate/up per expert split, down along its input
    # LoRA adapters (planner/lora.py, parallel/lora.py): sliced like their base layer, no collective of their own
    ADAPTER_COLWISE = "adapter_colwise"      # B of a column-parallel base: output rows split like the base's
    ADAPTER_ROWWISE = "adapter_rowwise"      # A of a row-parallel base: input columns split like the base's

    def __str__(self) -> str:
        return self.value


# A replicated block above this fraction of the model's parameters is a planning-time warning.
REPLICATED_WARN_FRACTION = 0.10

SHARDED_STYLES = {Style.COLWISE, Style.COLWISE_GATHER, Style.ROWWISE, Style.ROWWISE_SPLIT,
                  Style.VOCAB_EMBEDDING, Style.LM_HEAD, Style.HEAD_SHARDED, Style.EXPERTS,
                  Style.ADAPTER_COLWISE, Style.ADAPTER_ROWWISE}
ADAPTER_STYLES = {Style.ADAPTER_COLWISE, Style.ADAPTER_ROWWISE}  # only the planner gives them, to LoRA adapters


@dataclass(frozen=True)
class PlanEntry:
    style: Style
    source: str  # "hf-plan", "rule", "user", "family"
    reason: str
    # Fused layout along the sharded dim: ((block_size, replicas), ...); None = one contiguous block.
    blocks: tuple[tuple[int, int], ...] | None = None
    dim: int = 0  # head_sharded: the parameters' dimension that holds the heads (1 for an nn.Embedding table)

    def describe_layout(self) -> str:
        where = f" dim {self.dim}" if self.dim else ""
        if not self.blocks:
            return where
        return where + " blocks " + "+".join(f"{s}" + (f"x{r}rep" if r > 1 else "") for s, r in self.blocks)


@dataclass(frozen=True)
class AttentionPatch:
    """Per-rank values for an attention module: ``attrs`` are set on the module, ``config`` on a
    private copy of its ``config`` (for modules that read head counts from ``self.config``)."""

    attrs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    hooks: tuple[str, ...] = ()  # names in tp_trainer.planner.apply.HOOKS


@dataclass
class Plan:
    tp_size: int
    model_type: str
    entries: dict[str, PlanEntry]
    patches: dict[str, AttentionPatch] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    param_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def sharded_fraction(self) -> float:
        """Fraction of the model's parameter elements held by sharded modules (1.0 when nothing is counted)."""
        total = sum(self.param_counts.values())
        sharded = sum(n for name, n in self.param_counts.items()
                      if name in self.entries and self.entries[name].style in SHARDED_STYLES)
        return sharded / total if total else 1.0

    def replicated_blocks(self, *, threshold: float = REPLICATED_WARN_FRACTION) -> list[tuple[str, float, str]]:
        """``(pattern, fraction, reason)`` of replicated modules (layers collapsed to ``*``) holding more
        than ``threshold`` of the model's parameters, largest first."""
        total = sum(self.param_counts.values())
        if not total or self.tp_size == 1:
            return []
        groups: dict[str, list] = {}
        for name, n in self.param_counts.items():
            entry = self.entries.get(name)
            if entry is None or entry.style in SHARDED_STYLES:
                continue
            group = groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), [0, entry.reason])
            group[0] += n
        big = [(k, n / total, reason) for k, (n, reason) in groups.items() if n / total > threshold]
        return sorted(big, key=lambda row: -row[1])

    def style_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries.values():
            counts[e.style.value] = counts.get(e.style.value, 0) + 1
        return counts

    def summary(self) -> str:
        """One line for the startup log."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.style_counts().items()))
        sources = sorted({e.source for e in self.entries.values()})
        sharded = f"; {self.sharded_fraction():.1%} of parameters sharded" if self.param_counts else ""
        return f"{self.model_type} tp={self.tp_size}: {counts} (sources: {', '.join(sources)}){sharded}"

    def table(self, *, collapse_layers: bool = True) -> str:
        """Per-module style and reason; with ``collapse_layers`` repeated blocks print once as ``*``."""
        rows: dict[str, tuple[str, str, str, int]] = {}
        for name, e in self.entries.items():
            key = re.sub(r"\.\d+\.", ".*.", name) if collapse_layers else name
            row = (str(e.style) + e.describe_layout(), e.source, e.reason)
            if key in rows and rows[key][:3] == row:
                rows[key] = (*row, rows[key][3] + 1)
            else:
                rows[key if key not in rows else name] = (*row, 1)
        width = max((len(k) for k in rows), default=10)
        lines = [f"{'module':<{width}}  {'style':<28} {'source':<8} reason"]
        for key, (style, source, reason, n) in rows.items():
            lines.append(f"{key:<{width}}  {style:<28} {source:<8} {reason}" + (f"  [x{n}]" if n > 1 else ""))
        patch_rows: dict[str, tuple[str, int]] = {}
        for key, patch in self.patches.items():
            text = (f"{patch.attrs or ''}{' config ' + str(patch.config) if patch.config else ''}"
                    f"{' hooks ' + ','.join(patch.hooks) if patch.hooks else ''}")
            k = re.sub(r"\.\d+\.", ".*.", key) if collapse_layers else key
            patch_rows[k] = (text, patch_rows.get(k, (text, 0))[1] + 1)
        for key, (text, n) in patch_rows.items():
            lines.append(f"patch {key}: {text}" + (f"  [x{n}]" if n > 1 else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(f"WARNING: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def pattern_to_regex(pattern: str) -> re.Pattern:
    """HF plan keys: ``*`` matches one dotted component (a layer index)."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def match_plan(patterns: dict[str, str], name: str) -> tuple[str, str] | None:
    """The (pattern, style) of the most specific pattern matching ``name`` (fewest wildcards)."""
    best = None
    for pattern, style in patterns.items():
        if pattern_to_regex(pattern).match(name):
            if best is None or pattern.count("*") < best[0].count("*"):
                best = (pattern, style)
    return best
