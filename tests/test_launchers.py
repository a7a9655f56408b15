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


def test_self_launch_restarts_forwards_slurms_signal_and_gives_each_attempt_a_fresh_store():
    """What `tp-trainer train` asks of torch's elastic agent (issue 21; the behaviour: tests/test_resilience.py)."""
    import pytest

    from tp_trainer.app import launch

    cmd = launch.launcher_command(["train", "r.yaml"], 2, max_restarts=3, shutdown_timeout=90)
    assert "--max-restarts=3" in cmd and "--shutdown-timeout=90" in cmd
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd  # torchrun leaves SIGUSR1 out
    assert cmd[cmd.index("-m", 3):] == ["-m", "tp_trainer.cli", "train", "r.yaml"]
    script = launch.launcher_command(["--x", "1"], 2, entry=["train.py"])
    assert script[-3:] == ["train.py", "--x", "1"] and "--max-restarts=0" in script
    # torch 2.13 hands restarted workers the first attempt's rendezvous store (pytorch#135712)
    assert launch.launcher_env(2, environ={})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert launch.launcher_env(2, environ={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})[
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"  # a user's own choice stays
    for bad, words in [(dict(max_restarts=-1, shutdown_timeout=10), "max_restarts=-1"),
                       (dict(max_restarts=1, shutdown_timeout=0), "shutdown_timeout=0")]:
        with pytest.raises(ValueError, match=words):
            launch.check_restarts(**bad)
    launch.check_restarts(0, 1)
