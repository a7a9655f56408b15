"""The seed's experiment matrix in miniature: layouts, loss-curve agreement, figures and tables.

The seed trains one model under several data/tensor-parallel layouts at the same global batch
and shows that the loss curves coincide (its figures 3-6), that runs resumed from a mid-run
checkpoint follow the original curve (figures 7-8), and that evaluation improves equally for
every layout (table 1). This module holds the pure parts of that experiment; running it is
:mod:`tp_trainer.commands.report`.

Why the curves must agree: with the same initial weights, the same data order and the same
global batch, every layout computes the same per-token mean loss and the same update; only
the order of floating-point sums differs (TP splits matmuls and reductions, ZeRO reduce-scatters
instead of all-reducing). Those ~1e-7 relative differences grow slowly through training, so
curves agree closely but not bit for bit. A run with a different data order differs by the
batch-to-batch noise of the loss instead, which is orders of magnitude larger early on: the
check below separates the two (tests/test_main_job.py shows both outcomes).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Default agreement tolerance on the logged (window-averaged) training loss, absolute nats.
#: Measured on the default (docs/seed-miniature, 300 steps, logged every 10): layouts differ by at
#: most 2e-3 (summation order only), while the logged loss moves by a median 0.13 between
#: consecutive windows (batch-composition noise, which is what a different data order would show).
#: 0.03 is 15x the observed layout gap and 4x below that noise.
DEFAULT_TOLERANCE = 0.03


@dataclass(frozen=True)
class Layout:
    """One column of the experiment: a process layout at a fixed global batch."""
    name: str
    tp_size: int
    zero_stage: int
    nproc: int
    fsdp: bool = False

    @property
    def dp_size(self) -> int:
        return self.nproc // self.tp_size

    def per_device_batch(self, global_batch: int) -> int:
        """``gbs = per_device x nproc / tp x grad_accum`` with grad_accum 1."""
        if global_batch % self.dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by dp={self.dp_size} of layout {self.name}")
        return global_batch // self.dp_size

    def overrides(self, global_batch: int) -> list[str]:
        args = ["--tp_size", str(self.tp_size), "--zero_stage", str(self.zero_stage),
                "--nproc_per_node", str(self.nproc),
                "--per_device_train_batch_size", str(self.per_device_batch(global_batch)),
                "--gradient_accumulation_steps", "1"]
        if self.fsdp:
            args += ["--fsdp"]  # bare flag = True (FSDP2 full shard; tp_trainer.app.fsdp_baseline on CPU)
        return args


def seed_layouts(world: int = 4) -> list[Layout]:
    """The seed's layouts on ``world`` ranks (4: dp-only runs use dp 4, TP+ZeRO runs tp 2 x dp 2)."""
    if world < 2 or world % 2:
        raise ValueError(f"the layout matrix needs an even world size >= 2, got {world}")
    tp = 2
    return [
        Layout(f"ZeRO-1 dp{world}", 1, 1, world),
        Layout(f"ZeRO-2 dp{world}", 1, 2, world),
        Layout(f"FSDP full-shard dp{world} (ZeRO-3-like)", 1, 0, world, fsdp=True),
        Layout(f"TP{world} (no ZeRO)", world, 0, world),
        Layout(f"TP{tp} x ZeRO-1 dp{world // tp}", tp, 1, world),
        Layout(f"TP{tp} x ZeRO-2 dp{world // tp}", tp, 2, world),
    ]


def loss_curve(log_history: list[dict]) -> dict[int, float]:
    """``{step: logged training loss}`` from a Trainer's ``state.log_history``."""
    return {int(e["step"]): float(e["loss"]) for e in log_history if "loss" in e and "step" in e}


@dataclass(frozen=True)
class Agreement:
    name: str
    max_abs_diff: float
    worst_step: int | None
    steps_compared: int
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.steps_compared > 0 and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        if not self.steps_compared:
            return f"{self.name}: no common logged steps with the reference"
        verdict = "agrees" if self.agrees else "DISAGREES"
        return (f"{self.name}: {verdict} (max |loss diff| {self.max_abs_diff:.2e} at step {self.worst_step} over "
                f"{self.steps_compared} logged steps; tolerance {self.tolerance:g})")


def compare_curves(name: str, reference: dict[int, float], other: dict[int, float], *,
                   tolerance: float = DEFAULT_TOLERANCE, after_step: int = 0) -> Agreement:
    """Max absolute difference of two loss curves over their common logged steps ``> after_step``."""
    steps = sorted(s for s in reference.keys() & other.keys() if s > after_step)
    diffs = [(abs(reference[s] - other[s]), s) for s in steps]
    worst, step = max(diffs) if diffs else (float("nan"), None)
    return Agreement(name, worst, step, len(steps), tolerance)


def plot_overlay(curves: dict[str, dict[int, float]], path: str, *, title: str) -> str:
    """All layouts' loss curves on one axes (the seed's figures 3-6 on one plot), with an inset of the gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    ref_name, ref = next(iter(curves.items()))
    for i, (name, curve) in enumerate(curves.items()):
        steps = sorted(curve)
        style = dict(linestyle=styles[i % len(styles)], color=f"C{i % 10}")  # same colour in both panels
        ax.plot(steps, [curve[s] for s in steps], linewidth=1.6, label=name, **style)
        if i:
            common = sorted(curve.keys() & ref.keys())
            gap.plot(common, [curve[s] - ref[s] for s in common], label=name, **style)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    gap.axhline(0.0, color="black", linewidth=0.6)
    gap.set_ylabel(f"loss - {ref_name.split(' (')[0]}", fontsize=8)
    gap.set_xlabel("optimizer step")
    gap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_resume(original: dict[int, float], resumed: dict[int, float], resume_step: int, path: str, *,
                title: str) -> str:
    """The seed's figures 7-8: the original curve and the run resumed from ``resume_step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps = sorted(original)
    ax.plot(steps, [original[s] for s in steps], linewidth=2.4, alpha=0.6, label="original run")
    later = sorted(s for s in resumed if s > resume_step)
    ax.plot(later, [resumed[s] for s in later], "--", color="black", linewidth=1.3,
            label=f"resumed from checkpoint-{resume_step}")
    ax.axvline(resume_step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(rows: list[dict]) -> str:
    """Markdown: per layout, global batch, final training loss, eval loss, accuracy, agreement."""
    lines = ["| layout | world | tp | dp | ZeRO | global batch | final train loss | eval loss | accuracy | "
             "max gap to reference | agrees |",
             "|:---|---:|---:|---:|:---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        gap = "-" if r.get("gap") is None else f"{r['gap']:.1e}"
        agrees = "-" if r.get("agrees") is None else ("yes" if r["agrees"] else "**no**")
        lines.append(f"| {r['name']} | {r['world']} | {r['tp']} | {r['dp']} | {r['zero']} | {r['gbs']} | "
                     f"{r['final_loss']:.4f} | {r['eval_loss']:.4f} | {r['accuracy']:.1%} | {gap} | {agrees} |")
    return "\n".join(lines)
