"""Minor page faults per CPU training step with and without tp_trainer's malloc tuning (parallel/host.py).

    python scripts/host_faults.py            # prints the median step's faults, tuned and untuned, and their ratio

Each case runs a small bf16 Llama (2 layers, hidden 256, batch 4 x 256) through ParallelContext +
ShardedOptimizer in a fresh interpreter (the allocator setting is process-wide) and counts minor
page faults in each of 5 steps after two warm-up steps; the median step is reported, since the
kernel now and then reclaims and refaults a burst of pages in one step. Figures depend on the host
and its load: compare the two cases of one run only (docs/benchmarks.md has the measured history).
"""

from __future__ import annotations

import os
import subprocess
import sys

STEP_FAULTS = r"""
import resource, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tp_trainer.parallel.context import ParallelContext
from tp_trainer.zero import ShardedOptimizer

torch.set_num_threads(1)
ctx = ParallelContext.from_environment(1)
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048)
model = LlamaForCausalLM(config).to(torch.bfloat16)
opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), ctx, stage=0)
ids = torch.randint(0, 2048, (4, 256))

def step():
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()

step(); step()
faults = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sorted(faults)[2])
"""


def faults_per_step(**env) -> float:
    env = {**os.environ, "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **env}
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    tuned, untuned = faults_per_step(), faults_per_step(TP_TRAINER_CPU_MALLOC="0")
    print(f"median step minor faults: tuned {tuned:.0f}, untuned {untuned:.0f}, "
          f"tuned/untuned {tuned / max(untuned, 1):.3f}")


if __name__ == "__main__":
    main()
