"""Loading a model at tp=N: per-rank peak memory and time of shard-only loading against the two other ways.

    python scripts/bench_load.py [--tp 2] [--dir /tmp/tp_trainer_bench_load] [--layers 16] [--hidden 2048]

Makes (once, in ``--dir``) a Llama-shaped checkpoint with random weights from a config, saved with
``save_pretrained`` in bf16 in 500 MB shards (default shape: 856 M parameters, 1.71 GB; nothing
is downloaded), then loads it in a fresh ``torchrun`` world of ``--tp`` processes per method:

* ``shard-only``: ``tp_trainer.from_pretrained(dir, context=ctx)``;
* ``full+shard``: ``AutoModelForCausalLM.from_pretrained(dir)``, ``plan_tensor_parallel``,
  ``apply_tensor_parallel`` (what ``TPTrainer`` does with a model loaded the usual way);
* ``hf tp_plan``: transformers' native ``AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto")``
  (DTensor parameters; its own plan, not tp_trainer's).

All times and peaks are per rank, the slowest / highest rank shown.

What is measured, per rank: the resident set size just before the load (``VmRSS``: the runtime's
baseline, imports and process group included) and the kernel's peak resident set size during
the load (``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs`` just before).
``VmHWM`` counts mapped file pages too: transformers reads safetensors through ``mmap`` and its
parameters may stay views of the mapping, so its pages count while mapped; tp_trainer reads with
``pread`` into memory it owns, which ``VmHWM`` counts the same way. A sampling thread (every 2 ms)
also records the peak of ``RssAnon`` and ``RssFile`` apart, for the composition (a sample can miss
a spike shorter than its period: these are lower bounds). ``peak added`` = ``VmHWM - VmRSS
before``; ratio = peak added / the checkpoint's bytes. A parameter that is still a view of a file
mapping has not been read yet (its pages come in on first use), so every method's weights are then
touched once (one byte per 4 KiB page) and the peak is read again: ``weights touched`` is the
cost of having the weights in memory. The weights each rank holds afterwards
are hashed in name order: ``shard-only`` must give the same digest as ``full+shard``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import torch


def status() -> dict[str, int]:
    """``/proc/self/status`` memory fields in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self.done = period, {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def run(self):
        while not self.done.is_set():
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peak


def make_checkpoint(path: str, args) -> int:
    """The bf16 Llama checkpoint in ``path`` (made once); returns its tensor bytes."""
    import transformers as T

    marker = os.path.join(path, "bench_shape.json")
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    made = None
    if os.path.isfile(marker):
        with open(marker) as f:
            made = json.load(f)
    if made != shape:
        cfg = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                            vocab_size=args.vocab, tie_word_embeddings=False)
        torch.manual_seed(0)
        start = time.perf_counter()
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="500MB")
        del model
        with open(marker, "w") as f:
            json.dump(shape, f)
        print(f"checkpoint made in {time.perf_counter() - start:.0f} s: {path}", flush=True)
    from tp_trainer.loading.files import SafetensorsDir

    files = SafetensorsDir(path)
    return sum(torch.empty((), dtype=i.dtype).element_size() * int(torch.tensor(i.shape).prod())
               for i in files.tensors.values())


def held_tensors(model):
    """``(name, local tensor)`` of every parameter and buffer this rank holds (DTensors: their local shard)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach()
        yield name, (t.to_local() if hasattr(t, "to_local") else t)


def worker(args) -> None:
    import torch.distributed as dist
    import transformers as T

    from tp_trainer import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.loading import from_pretrained
    from tp_trainer.parallel.context import ParallelContext

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    ctx = ParallelContext.from_environment(args.tp) if args.method != "hf tp_plan" else None
    if ctx is None:
        dist.init_process_group("gloo")
    dist.barrier()
    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    error = None
    try:
        if args.method == "shard-only":
            model = from_pretrained(args.dir, context=ctx)
        elif args.method == "full+shard":
            model = T.AutoModelForCausalLM.from_pretrained(args.dir)
            apply_tensor_parallel(model, plan_tensor_parallel(model, args.tp), ctx)
        else:
            model = T.AutoModelForCausalLM.from_pretrained(args.dir, tp_plan="auto")
    except Exception as err:  # reported in the table, with its message
        error, model = f"{type(err).__name__}: {err}", None
    seconds = time.perf_counter() - start
    after = status()
    result = {"rank": rank, "seconds": seconds, "rss_before": before["VmRSS"], "hwm": after["VmHWM"], "error": error}
    if model is not None:  # a parameter may be a view of a file mapping not read yet: touch every page once
        start = time.perf_counter()
        for _, t in held_tensors(model):
            flat = t.contiguous().view(-1).view(torch.uint8)
            flat[::4096].sum()
        result.update(touch_seconds=time.perf_counter() - start, hwm_touched=status()["VmHWM"])
    sampled = sampler.stop()
    result.update(anon_peak=sampled["RssAnon"] - before["RssAnon"], file_peak=sampled["RssFile"] - before["RssFile"])
    if model is not None:
        digest, held = hashlib.sha256(), 0
        for name, t in sorted(held_tensors(model), key=lambda item: item[0]):
            if args.method != "hf tp_plan":
                digest.update(name.encode())
                digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            held += t.numel() * t.element_size()
        result.update(held=held, digest=digest.hexdigest())
    with open(os.path.join(args.out, f"{args.method.replace(' ', '_').replace('+', '_')}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run_method(method: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp), "--monitor-interval", "1",
           __file__, "--worker", "--method", method, "--tp", str(args.tp), "--dir", args.dir, "--out", args.out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    tag = method.replace(" ", "_").replace("+", "_")
    paths = [os.path.join(args.out, f"{tag}-{r}.json") for r in range(args.tp)]
    if proc.returncode != 0 and not all(os.path.isfile(p) for p in paths):
        return [{"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}]
    results = []
    for p in paths:
        with open(p) as f:
            results.append(json.load(f))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/tp_trainer_bench_load")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", default="shard-only,full+shard,hf tp_plan")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.dir, exist_ok=True)
    total = make_checkpoint(args.dir, args)
    args.out = os.path.join(args.dir, "results")
    os.makedirs(args.out, exist_ok=True)
    print(f"checkpoint: {total / 1e9:.2f} GB of bf16 tensors in {args.dir}; tp={args.tp}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    rows = {m: run_method(m, args) for m in args.methods.split(",")}
    print("| method | load (s) | + first touch (s) | peak added (GB) | / checkpoint | peak added, weights touched "
          "(GB) | / checkpoint | sampled peak anon / file (GB) | held (GB) | weights |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    reference = rows.get("full+shard")
    for method, ranks in rows.items():
        errors = [r["error"] for r in ranks if r.get("error")]
        if errors:
            print(f"| {method} | failed: {errors[0]} | | | | | |")
            continue
        peak = max(r["hwm"] - r["rss_before"] for r in ranks)
        touched = max(r["hwm_touched"] - r["rss_before"] for r in ranks)
        same = ("same as full+shard" if reference and all(a.get("digest") == b.get("digest")
                                                          for a, b in zip(ranks, reference))
                else ("-" if method != "shard-only" else "DIFFERENT"))
        print(f"| {method} | {max(r['seconds'] for r in ranks):.1f} | {max(r['touch_seconds'] for r in ranks):.1f} | "
              f"{peak / 1e9:.2f} | {peak / total:.2f} | {touched / 1e9:.2f} | {touched / total:.2f} | "
              f"{max(r['anon_peak'] for r in ranks) / 1e9:.2f} / {max(r['file_peak'] for r in ranks) / 1e9:.2f} | "
              f"{max(r['held'] for r in ranks) / 1e9:.2f} | {same} |")


if __name__ == "__main__":
    main()
