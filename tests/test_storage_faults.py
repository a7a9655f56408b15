"""Storage faults during a checkpoint save (issue 21, part 5): a full disk, a read-only output directory, a
checkpoint directory removed mid-save.

Each fault must give one clear :class:`CheckpointSaveError` naming the path, the cause and the fix, on every
rank (a fault on ONE rank of a 2-rank gloo world: the other learns it at the save's next all-gather instead of
hanging); the partial ``.tmp-checkpoint-N`` is removed; the previous complete checkpoint is untouched (it still
validates: sizes and sha256 of every file); rotation never deletes a complete checkpoint because a newer save
failed. The process runs as root, so the faults are injected at the write / rename layer (``save_file``,
``os.makedirs``, ``os.rename``, ``os.open``), or are real (the temporary directory removed by a hook).
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from distributed import run_distributed
from models import tiny_model

pytestmark = pytest.mark.cpu_only(reason="a 2-rank world of TP-sharded models on gloo, faults injected per rank")


# ------------------------------------------------------------------------------------ faults
def _fail_save_file(code, *, rank, ctx_rank, when=lambda path: True):
    """Make ``save.save_file`` (the safetensors write of every rank file) raise ``OSError(code)`` on ``rank``."""
    from tp_trainer.checkpoint import save

    real = save.save_file

    def failing(tensors, path, **kwargs):
        if ctx_rank == rank and when(path):
            raise OSError(code, os.strerror(code), path)
        return real(tensors, path, **kwargs)

    save.save_file = failing
    return lambda: setattr(save, "save_file", real)


def _remove_tmp_before_write(*, rank, ctx_rank):
    """On ``rank``, delete the whole temporary directory just before writing a file into it (a real ENOENT)."""
    from tp_trainer.checkpoint import save

    real = save.save_file

    def removing(tensors, path, **kwargs):
        if ctx_rank == rank:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        return real(tensors, path, **kwargs)

    save.save_file = removing
    return lambda: setattr(save, "save_file", real)


def read_only_under(monkeypatch, prefix) -> None:
    """``os.open`` of any path under ``prefix`` fails with ``EROFS``, as on a read-only mount."""
    real = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(prefix)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)


def _fail_os(name, code, *, rank, ctx_rank, suffix):
    """Make ``os.NAME(path, ...)`` raise ``OSError(code)`` on ``rank`` when ``path`` ends with ``suffix``."""
    real = getattr(os, name)

    def failing(path, *args, **kwargs):
        if ctx_rank == rank and str(path).endswith(suffix):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    setattr(os, name, failing)
    return lambda: setattr(os, name, real)


FAULTS = {  # name: (step saved after checkpoint-1, fault(ctx_rank) -> undo)
    "no_space_rank1": (2, lambda r: _fail_save_file(errno.ENOSPC, rank=1, ctx_rank=r)),
    "read_only_tmp_rank0": (2, lambda r: _fail_os("makedirs", errno.EROFS, rank=0, ctx_rank=r,
                                                  suffix=".tmp-checkpoint-2")),
    "read_only_publish_rank0": (2, lambda r: _fail_os("rename", errno.EROFS, rank=0, ctx_rank=r,
                                                      suffix=".tmp-checkpoint-2")),
    "removed_rank1": (2, lambda r: _remove_tmp_before_write(rank=1, ctx_rank=r)),
    # checkpoint-1 saved again, its rename fails: the earlier checkpoint-1 (moved aside first) must come back
    "same_step_rename_rank0": (1, lambda r: _fail_os("rename", errno.EROFS, rank=0, ctx_rank=r,
                                                     suffix=".tmp-checkpoint-1")),
}


def _files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def faulty_saves(base):
    import torch.distributed as dist

    from tp_trainer import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.checkpoint import CheckpointReader, CheckpointSaveError, write_checkpoint
    from tp_trainer.parallel.context import ParallelContext

    ctx = ParallelContext.from_environment(2)
    model = tiny_model("llama")
    apply_tensor_parallel(model, plan_tensor_parallel(model, 2), ctx)
    results = {}
    for name, (step, fault) in FAULTS.items():
        out = f"{base}/{name}"
        write_checkpoint(f"{out}/checkpoint-1", model=model, optimizer=None, ctx=ctx, zero_stage=0)
        before = _files(f"{out}/checkpoint-1")
        undo = fault(ctx.rank)
        try:
            write_checkpoint(f"{out}/checkpoint-{step}", model=model, optimizer=None, ctx=ctx, zero_stage=0)
            got = None
        except CheckpointSaveError as err:
            got = {"message": str(err), "errno": err.errno, "filename": err.filename,
                   "classes": [c.__name__ for c in type(err).__mro__]}
        finally:
            undo()
        dist.barrier()
        CheckpointReader.open(f"{out}/checkpoint-1", model=model, ctx=ctx)  # complete and valid: sizes, sha256
        results[name] = {"error": got, "dirs": sorted(os.listdir(out)),
                         "unchanged": _files(f"{out}/checkpoint-1") == before}
        dist.barrier()
    results["trainer"] = trainer_save_fails(f"{base}/trainer", ctx.rank)
    return results


def trainer_save_fails(out, rank):
    """TPTrainer at tp=2, save_total_limit=1: the disk fills on rank 1 during the save of step 4."""
    import datasets

    from tp_trainer import TPTrainer, TPTrainingArguments
    from tp_trainer.checkpoint import CheckpointSaveError, is_complete

    ids = (torch.arange(16) + torch.arange(16)[:, None]) % 90 + 3
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TPTrainingArguments(output_dir=out, tp_size=2, per_device_train_batch_size=4, max_steps=4,
                               save_strategy="steps", save_steps=2, save_total_limit=1, report_to=[],
                               use_cpu=True, disable_tqdm=True)
    trainer = TPTrainer(model=tiny_model("llama"), args=args, train_dataset=train)
    undo = _fail_save_file(errno.ENOSPC, rank=1, ctx_rank=rank, when=lambda path: "checkpoint-4" in path)
    try:
        trainer.train()
        message = None
    except CheckpointSaveError as err:
        message = str(err)
    finally:
        undo()
    return {"message": message, "dirs": sorted(os.listdir(out)), "complete": is_complete(f"{out}/checkpoint-2")}


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("faults"))
    results = run_distributed(faulty_saves, 2, base, timeout=300)
    return base, results


# ------------------------------------------------------------------------------------ the 2-rank world
@pytest.mark.parametrize("name", list(FAULTS))
def test_every_rank_raises_the_same_error_and_the_previous_checkpoint_is_intact(faults, name):
    base, results = faults
    got = [r[name] for r in results]
    assert got[0]["error"] is not None and got[1]["error"] is not None, f"{name}: a rank did not raise: {got}"
    assert got[0]["error"]["message"] == got[1]["error"]["message"]
    assert {"CheckpointError", "OSError", "RuntimeError"} <= set(got[0]["error"]["classes"])
    assert got[0]["unchanged"], f"{name}: checkpoint-1 was modified"
    assert got[0]["dirs"] == ["checkpoint-1"], f"{name}: left {got[0]['dirs']} (a partial save, or lost checkpoint-1)"
    message = got[0]["error"]["message"]
    assert f"{base}/{name}/checkpoint-1" in message, message  # what resume_from_checkpoint: auto resumes from
    assert "earlier checkpoints are intact" in message, message


def test_a_full_disk_names_the_directory_the_cause_and_the_fix(faults):
    base, results = faults
    error = results[0]["no_space_rank1"]["error"]
    message = error["message"]
    assert f"saving {base}/no_space_rank1/checkpoint-2 failed (rank 1: OSError: [Errno 28]" in message, message
    assert f"no space left on device (or the disk quota is exhausted) for {base}/no_space_rank1" in message
    assert "lower save_total_limit" in message and "larger disk" in message
    assert error["errno"] == errno.ENOSPC and error["filename"] == f"{base}/no_space_rank1"


@pytest.mark.parametrize("name", ["read_only_tmp_rank0", "read_only_publish_rank0", "same_step_rename_rank0"])
def test_a_read_only_directory_names_it_and_the_fix(faults, name):
    base, results = faults
    error = results[1][name]["error"]  # rank 1 wrote fine: it learns rank 0's failure from the all-gather
    assert "rank 0: OSError: [Errno 30]" in error["message"] and "rank 1" not in error["message"]
    assert f"{base}/{name} is read-only / not writable" in error["message"], error["message"]
    assert "output_dir to a writable directory" in error["message"]
    assert error["errno"] == errno.EROFS


def test_a_directory_removed_while_saving_is_named(faults):
    base, results = faults
    message = results[0]["removed_rank1"]["error"]["message"]
    assert "rank 1: SafetensorError:" in message and "os error 2" in message, message  # the real error
    assert f"{base}/removed_rank1/.tmp-checkpoint-2 was removed while saving" in message, message
    assert "give each run its own output_dir" in message


def test_a_failed_save_in_training_raises_everywhere_and_rotation_keeps_the_last_checkpoint(faults):
    base, results = faults
    got = [r["trainer"] for r in results]
    assert got[0]["message"] is not None and got[0]["message"] == got[1]["message"], got
    assert "checkpoint-4 failed (rank 1: OSError: [Errno 28]" in got[0]["message"]
    assert f"{base}/trainer/checkpoint-2, is what resume_from_checkpoint: auto resumes from" in got[0]["message"]
    assert got[0]["dirs"] == ["checkpoint-2"] and got[0]["complete"], got[0]


# ------------------------------------------------------------------------------------ single process
def test_rotation_counts_only_complete_checkpoints(tmp_path):
    from tp_trainer.checkpoint import MANIFEST, rotate_checkpoints

    for step, complete in [(2, True), (4, True), (6, False), (8, False)]:
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text("{}")
    rotate_checkpoints(str(tmp_path), 2, None)  # 6 and 8 (failed saves of the plain Trainer) push nothing out
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


def test_rotation_counts_the_best_checkpoint_in_the_limit(tmp_path):
    from tp_trainer.checkpoint import MANIFEST, rotate_checkpoints

    for step in (2, 4, 6):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text("{}")
    rotate_checkpoints(str(tmp_path), 2, str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6"]


def test_check_writable_probes_with_a_real_file(tmp_path, monkeypatch):
    from tp_trainer.checkpoint import check_writable

    check_writable(str(tmp_path / "new" / "out"))  # created, probed, the probe removed
    assert os.listdir(tmp_path / "new" / "out") == []
    read_only_under(monkeypatch, tmp_path / "ro")
    with pytest.raises(ValueError) as err:
        check_writable(str(tmp_path / "ro"))
    assert f"output_dir '{tmp_path}/ro' is not usable" in str(err.value)
    assert "is read-only / not writable" in str(err.value) and "writable directory" in str(err.value)
