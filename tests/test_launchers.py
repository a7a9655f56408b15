"""The same user script runs under torchrun and under accelerate launch (its torchrun-based launcher)."""

import os
import subprocess
import sys

from distributed import free_port, skip_unless_world_fits

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")
FLAGS = ["--tp_size", "2", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy",
         "no", "--disable_tqdm", "true", "--learning_rate", "1e-2"]  # no --use_cpu: chosen when there is no GPU


def _run(launcher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(launcher + [SCRIPT, "--output_dir", str(tmp_path)] + FLAGS, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    return line, out.stderr


def test_torchrun_and_accelerate_launch_train_identically(tmp_path):
    skip_unless_world_fits(2)
    torchrun, log = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--monitor-interval", "5", "--master-port", str(free_port())], tmp_path / "torchrun")
    accel, _ = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--monitor_interval", "5", "--main_process_port", str(free_port())], tmp_path / "accelerate")
    assert torchrun.startswith("RESULT 2 1 [") and torchrun == accel
