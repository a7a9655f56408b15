"""The check's result, its report and its one-line verdict.

:class:`VerifyResult` holds what rank 0 measured (:class:`~.compare.TensorDiff` rows of the
logits, the module outputs and the gradients), or why the check stopped. Its verdict is one of:

- ``verify: PASS``: every gradient, module output, the logits and the loss within their limits;
- ``verify: FAIL``: the plan is wrong: a difference over a limit (the first module output that
  differs in forward order is named as the root cause, everything after it follows from it), a
  gradient present on one side only, or the planned model raised (the stage, the module running
  and the traceback of the first rank that failed);
- ``verify: ERROR``: the check itself could not run (the truncated model cannot be built or
  planned, not enough memory, a rank failed before the plan was used, a timeout).

:func:`collect` turns the ranks' records into the result. Nothing here communicates.

Caveat: a MoE router whose top-k scores tie within rounding could route a token differently in
the two runs; with random weights and 64 tokens this is very unlikely, and a FAIL confined to
expert weights with a matching loss is the sign of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .compare import GRAD_RTOL, LOGITS_RTOL, LOSS_RTOL, OUTPUT_RTOL, TensorDiff

TOP = 10             # modules listed in the report
TRACEBACK_LINES = 40  # of a failed rank's traceback in the report (its innermost frames)

# Stages whose failure is the plan's (FAIL) and the ones before the plan is used (ERROR).
PLAN_STAGES = ("applying the plan", "forward of the sharded model",
               "backward of the sharded model", "reducing and gathering")


@dataclass
class VerifyResult:
    tp_size: int
    setup: list[str] = field(default_factory=list)
    loss_ref: float | None = None
    loss_tp: float | None = None
    logits: TensorDiff | None = None
    grads: list[TensorDiff] = field(default_factory=list)
    outputs: list[TensorDiff] = field(default_factory=list)  # module outputs, in the order they were produced
    missing: list[str] = field(default_factory=list)   # parameters with a reference gradient but none under TP
    extra: list[str] = field(default_factory=list)     # ... and the other way round
    failure: str | None = None       # the planned model raised: the stage, the error and the traceback
    error: str | None = None         # the check itself could not run (the unsharded model fails, no memory)
    timings: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def loss_relative(self) -> float | None:
        if self.loss_ref is None or self.loss_tp is None:
            return None
        if not (math.isfinite(self.loss_ref) and math.isfinite(self.loss_tp)):
            return math.inf
        return abs(self.loss_tp - self.loss_ref) / max(abs(self.loss_ref), 1e-12)

    def bad_grads(self) -> list[TensorDiff]:
        return [d for d in self.grads if not d.relative <= GRAD_RTOL]

    def worst_grad(self) -> TensorDiff | None:
        return max(self.grads, key=lambda d: d.relative, default=None)

    def first_bad_output(self) -> tuple[TensorDiff | None, TensorDiff | None]:
        """The first module output (in forward order) over the limit, and the last one within it before that."""
        last_good = None
        for d in self.outputs:
            if not d.relative <= OUTPUT_RTOL:
                return d, last_good
            last_good = d
        return None, last_good

    @property
    def passed(self) -> bool:
        if self.error or self.failure or self.missing or self.extra or not self.grads:
            return False
        if self.bad_grads() or self.first_bad_output()[0] is not None:
            return False
        if self.loss_relative is None or not self.loss_relative <= LOSS_RTOL:
            return False
        return self.logits is not None and self.logits.relative <= LOGITS_RTOL

    def per_module(self) -> list[TensorDiff]:
        """The worst tensor of each module, worst module first."""
        worst: dict[str, TensorDiff] = {}
        for d in self.grads:
            if d.module not in worst or d.relative > worst[d.module].relative:
                worst[d.module] = d
        return sorted(worst.values(), key=lambda d: -d.relative if not math.isnan(d.relative) else -math.inf)

    # ------------------------------------------------------------------------------ the verdict
    def verdict(self) -> str:
        if self.error:
            return f"verify: ERROR (the check could not run: {first_line(self.error)})"
        if self.failure:
            return f"verify: FAIL (the planned model raised: {first_line(self.failure)})"
        if self.passed:
            w = self.worst_grad()
            return (f"verify: PASS (largest gradient difference {w.relative:.1e} of the gradient's magnitude "
                    f"({w.max_abs_diff:.1e} absolute) at {w.name})")
        first, before = self.first_bad_output()
        reasons = self._forward_reasons(first, before) if first is not None else self._difference_reasons()
        if self.missing:
            reasons.append(f"no gradient under TP for {', '.join(self.missing[:3])}")
        if self.extra:
            reasons.append(f"gradients under TP only: {', '.join(self.extra[:3])}")
        if not self.grads:
            reasons.append("no gradient compared")
        return "verify: FAIL (" + "; ".join(reasons) + ")"

    def _loss_bad(self) -> bool:
        rel = self.loss_relative
        return rel is None or not rel <= LOSS_RTOL

    def _logits_bad(self) -> bool:
        return self.logits is None or not self.logits.relative <= LOGITS_RTOL

    def _forward_reasons(self, first: TensorDiff, before: TensorDiff | None) -> list[str]:
        """The root cause is in the forward: everything after it follows."""
        bad = self.bad_grads()
        after = [what for what, is_bad in (("the loss", self._loss_bad()), ("the logits", self._logits_bad())) if is_bad]
        if bad:
            after.append(f"{len(bad)} of {len(self.grads)} gradients")
        return [f"the forward first differs at {first.name} ({first.relative:.2g} of its output's magnitude"
                + (f"; {first.plan}" if first.plan else "") + ")"
                + (f", after {before.name} matched" if before is not None else "")
                + (f"; then {', '.join(after)} differ" if after else "")]

    def _difference_reasons(self) -> list[str]:
        """The forward matches: the worst gradient over the limit, then the loss and the logits."""
        reasons = []
        bad = self.bad_grads()
        rel = self.loss_relative
        if bad:
            w = max(bad, key=lambda d: d.relative)
            modules = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", d.module) for d in bad})
            reasons.append(f"gradient of {w.name} differs by {w.relative:.2g} of its magnitude "
                           f"({w.max_abs_diff:.2e} absolute; limit {GRAD_RTOL:g})"
                           + (f" [{w.plan}]" if w.plan else "")
                           + (f"; {len(bad)} gradients over the limit, in {', '.join(modules[:4])}"
                              + (" ..." if len(modules) > 4 else "") if len(bad) > 1 else ""))
        if self._loss_bad():
            reasons.append(f"loss {self.loss_tp} vs {self.loss_ref} unsharded (relative {rel:.2g}, limit "
                           f"{LOSS_RTOL:g})" if rel is not None else "no loss")
        if self._logits_bad():
            reasons.append(f"logits differ by {self.logits.relative:.2g} of their magnitude (limit "
                           f"{LOGITS_RTOL:g})" if self.logits is not None else "no logits")
        return reasons

    # ------------------------------------------------------------------------------- the report
    def report(self) -> str:
        lines = [f"verification: one training step at tp={self.tp_size} ({self.tp_size} gloo processes on the CPU) "
                 f"against the unsharded model, from the same weights"]
        lines += [f"  {s}" for s in self.setup]
        lines += self._loss_and_logits_lines()
        if self.outputs:
            lines.append(self._forward_line())
        if self.grads:
            lines += self._gradient_lines()
        for name in self.missing:
            lines.append(f"  {name}: has a gradient in the unsharded model, none under TP")
        for name in self.extra:
            lines.append(f"  {name}: has a gradient under TP, none in the unsharded model")
        for text in (self.failure, self.error):
            if text:
                lines.append("  " + text.rstrip().replace("\n", "\n  "))
        if self.timings or self.wall_s:
            parts = [f"{k} {v:.1f} s" for k, v in self.timings.items()]
            lines.append(f"  time: {', '.join(parts)}{'; ' if parts else ''}total {self.wall_s:.1f} s")
        lines.append(self.verdict())
        return "\n".join(lines)

    def _loss_and_logits_lines(self) -> list[str]:
        lines = []
        if self.loss_ref is not None:
            rel = self.loss_relative
            lines.append(f"  loss: unsharded {self.loss_ref:.8f}, tp {self.loss_tp:.8f}, relative difference "
                         f"{rel:.1e} (limit {LOSS_RTOL:g})" if rel is not None else f"  loss: unsharded {self.loss_ref:.8f}")
        if self.logits is not None:
            d = self.logits
            lines.append(f"  logits {list(d.shape)}: largest difference {d.max_abs_diff:.2e} = {d.relative:.1e} of the "
                         f"largest |logit| {d.ref_max:.3g} (limit {LOGITS_RTOL:g})")
        return lines

    def _forward_line(self) -> str:
        first, before = self.first_bad_output()
        if first is None:
            w = max(self.outputs, key=lambda d: d.relative)
            return (f"  forward: the outputs of {len(self.outputs)} modules compared (column-parallel shards "
                    f"gathered), all within {OUTPUT_RTOL:g} of their magnitude (largest {w.relative:.1e} at "
                    f"{w.name})")
        return (f"  forward: the outputs of {len(self.outputs)} modules compared in call order; they match "
                + (f"up to {before.name}, " if before is not None else "nowhere: ")
                + f"then first differ at {first.name}: {first.max_abs_diff:.2e} = {first.relative:.2g} of "
                f"its largest |output| {first.ref_max:.3g}" + (f" [{first.plan}]" if first.plan else "")
                + ". The fault lies there or in what runs between the two (a split, a fused layout, "
                "patched head counts); every later difference follows from it")

    def _gradient_lines(self) -> list[str]:
        """A table of the :data:`TOP` worst modules, by their worst gradient tensor."""
        modules = self.per_module()
        lines = [(f"  gradients: {len(self.grads)} tensors of {len(modules)} modules compared; largest "
                  f"difference per module, relative to the gradient's largest |value| (limit {GRAD_RTOL:g}), "
                  f"worst {min(TOP, len(modules))}:")]
        width = max(len(d.module) for d in modules[:TOP])
        lines.append(f"    {'module':<{width}}  {'tensor':<8} {'max |diff|':>10} {'max |grad|':>10} {'relative':>9}  plan")
        for d in modules[:TOP]:
            flag = "  <-- over the limit" if not d.relative <= GRAD_RTOL else ""
            lines.append(f"    {d.module:<{width}}  {d.name.rsplit('.', 1)[-1]:<8} {d.max_abs_diff:>10.2e} "
                         f"{d.ref_max:>10.2e} {d.relative:>9.1e}  {d.plan}{flag}")
        return lines


def tail(text: str, lines: int) -> str:
    """``text`` cut to its first line and its last ``lines - 1`` lines."""
    rows = text.splitlines()
    if len(rows) <= lines:
        return text
    return "\n".join(rows[:1] + [f"  ... ({len(rows) - lines} lines)"] + rows[-(lines - 1):])


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return text


def collect(result: VerifyResult, records: dict[int, dict], timed_out: bool, tp: int, timeout: float) -> None:
    """Fill ``result`` from the ranks' records: rank 0's report, or the first failure (FAIL during a
    :data:`PLAN_STAGES` stage, else ERROR), or a timeout."""
    failures = sorted(((r, rec) for r, rec in records.items() if not rec.get("ok")), key=lambda x: x[1]["time"])
    if timed_out and not failures:
        result.error = f"the {tp} processes did not finish within {timeout:.0f} s"
        return
    if failures:
        _collect_failure(result, failures, records)
        return
    rep = records[0]["result"]
    result.loss_ref, result.loss_tp = rep["loss_ref"], rep["loss_tp"]
    result.logits = TensorDiff("logits", *rep["logits"])
    result.grads = [TensorDiff(*row) for row in rep["grads"]]
    result.missing, result.extra = rep["missing"], rep["extra"]
    result.timings.update(rep["timings"])
    result.outputs = [TensorDiff(*row) for row in rep["outputs"]]


def _collect_failure(result: VerifyResult, failures: list[tuple[int, dict]], records: dict[int, dict]) -> None:
    rank, rec = failures[0]  # the first to fail; the others usually failed because it left
    where = f" in {rec['module']}" if rec.get("module") else ""
    text = (f"rank {rank}, {rec['stage']}{where}: {first_line(rec['error'].splitlines()[-1] if rec['error'] else '')}"
            f"\n{tail(rec['error'].rstrip(), TRACEBACK_LINES)}")
    others = [f"rank {r}: {rec2['stage']}: {first_line(rec2['error'].strip().splitlines()[-1])}"
              for r, rec2 in failures[1:] if rec2.get("error")]
    if others:
        text += "\nthen: " + "; ".join(others)
    if rec["stage"] in PLAN_STAGES:
        result.failure = text
    else:
        result.error = text
    partial = records.get(0, {}).get("partial") or {}
    result.timings.update(partial.get("timings", {}))
