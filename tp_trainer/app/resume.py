"""Which checkpoint a run resumes from: ``resume_from_checkpoint: auto | PATH | none``.

``auto`` (the default of ``tp-trainer train``) takes the newest *complete* ``checkpoint-N`` in
``output_dir``, or starts from step 0 when there is none. Complete means:

* a sharded checkpoint (tp_trainer's): its manifest ``tp_checkpoint.json`` parses and every file
  it lists is there at the recorded size. Saves write into ``.tmp-checkpoint-N`` and publish with
  one rename after the manifest, so a save killed at any moment leaves no ``checkpoint-N``; what
  this check adds is a checkpoint damaged afterwards (a rotation killed while deleting it, a copy
  that lost a rank's file). The sha256 of every file is checked when it loads, split over ranks;
* a plain Trainer checkpoint: ``trainer_state.json`` parses (the Trainer writes it after the
  weights, optimizer and scheduler) and a weights file is there.

A ``checkpoint-N`` that is not complete is skipped with a warning naming what is missing; a
``.tmp-*`` directory is never a candidate. ``none`` (or ``null``, ``no``, ``false``) starts from
step 0; a ``PATH`` must be a complete checkpoint (checked before anything is launched, by
:func:`check_resume_value`).

``overwrite_output_dir`` starts over: the ``checkpoint-*`` directories of ``output_dir`` are
deleted (else a later ``auto`` would pick up the old run's). Both it and a ``PATH`` apply to the
first attempt only: a worker restarted by torchrun (``TORCHELASTIC_RESTART_COUNT > 0``) continues
from the newest complete checkpoint of this run, which is what the restart is for.

Every rank must resume from the same checkpoint: rank 0 decides (and deletes), then broadcasts
the decision (one ``broadcast_object_list`` on the world group) when a process group exists.

A checkpoint trained with another tokenizer would load without complaint when the vocabularies
have the same size, and every token id would mean another token: :func:`check_same_tokenizer`
compares the tokenizer saved in the checkpoint with the run's before anything is launched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..checkpoint.layout import FORMAT, MANIFEST, TMP_PREFIX, TRAINER_STATE

logger = logging.get_logger(__name__)

AUTO = "auto"
NONE_VALUES = ("none", "null", "no", "false", "")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Resume:
    """Where a run starts: ``path`` (``None``: step 0) at ``step``, and the line that says so."""

    path: str | None
    step: int
    message: str
    skipped: tuple[str, ...] = ()  # why each newer checkpoint-N was not taken


# ------------------------------------------------------------------------------------------ completeness
def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint (see the module docstring), or ``None`` if it is one."""
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    manifest = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                record = json.load(f)
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{manifest} is unreadable ({type(err).__name__}: {err})"
        if record.get("format") != FORMAT:
            return f"{manifest} is not a {FORMAT} manifest"
        for fname, rec in sorted(files.items()):
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                return f"{fpath} is missing"
            if os.path.getsize(fpath) != rec.get("bytes"):
                return f"{fpath} has {os.path.getsize(fpath)} bytes, the manifest says {rec.get('bytes')}"
        return None
    state = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state):
        return (f"{path} has neither {MANIFEST} nor {TRAINER_STATE}: an interrupted save of the plain Trainer, or not a "
                "checkpoint")
    try:
        with open(state) as f:
            json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{state} is unreadable ({type(err).__name__}: {err})"
    if not any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHTS):
        return f"{path} holds no weights ({', '.join(_WEIGHTS[:2])}, ...)"
    return None


def checkpoint_step(path: str) -> int:
    """The step a complete checkpoint was saved at (``global_step`` of its trainer state, else its name's N)."""
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
        return int(match.group(1)) if match else 0


def checkpoints_in(output_dir: str) -> list[tuple[int, str]]:
    """``(N, path)`` of every ``checkpoint-N`` directory in ``output_dir``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(d)) and os.path.isdir(os.path.join(output_dir, d))]
    return sorted(found)


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (``None`` if there is none) and, for every newer
    one that was skipped, why."""
    skipped = []
    for _, path in reversed(checkpoints_in(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(problem)
    return None, skipped


# ------------------------------------------------------------------------------------------ the decision
def is_none(value) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in NONE_VALUES)


def is_auto(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in (AUTO, "true"))


def check_resume_value(value, output_dir: str, *, overwrite: bool = False) -> None:
    """Before launching: ``value`` is ``auto``, none, or a complete checkpoint (not inside ``output_dir`` when
    ``overwrite`` is to empty it); a ValueError naming the value and the fix otherwise."""
    if is_none(value) or is_auto(value):
        return
    if overwrite and os.path.abspath(str(value)).startswith(os.path.join(os.path.abspath(output_dir), "")):
        raise ValueError(f"resume_from_checkpoint={value!r} lies in output_dir {output_dir!r}, whose checkpoints "
                         "overwrite_output_dir deletes: drop overwrite_output_dir to resume from it, or copy it elsewhere")
    problem = checkpoint_problem(str(value))
    if problem is not None:
        newest, _ = newest_complete_checkpoint(output_dir)
        hint = f" ({newest} is the newest complete one in output_dir)" if newest else ""
        raise ValueError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: {problem}. Give a "
                         f"checkpoint-N directory{hint}, 'auto' (the newest complete one in output_dir, or step 0) or "
                         "'none'")


def clear_checkpoints(output_dir: str) -> list[str]:
    """Delete the ``checkpoint-N`` and ``.tmp-checkpoint-N`` directories of ``output_dir``; returns what went."""
    if not os.path.isdir(output_dir):
        return []
    gone = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (_CHECKPOINT.match(name) or name.startswith(TMP_PREFIX + PREFIX_CHECKPOINT_DIR)) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def decide(value, output_dir: str, *, overwrite: bool = False, restart_count: int = 0) -> Resume:
    """The decision of one process (rank 0's is the one that counts; it may delete, see the module docstring)."""
    if restart_count > 0:
        path, skipped = newest_complete_checkpoint(output_dir)
        explicit = None if is_none(value) or is_auto(value) or overwrite else str(value)
        if explicit is not None and (path is None or checkpoint_step(path) <= checkpoint_step(explicit)):
            path, skipped = explicit, []
        return _resume_at(path, skipped, output_dir, why=f"restart {restart_count}")
    if overwrite:
        check_resume_value(value, output_dir, overwrite=True)
        gone = clear_checkpoints(output_dir)
        if is_none(value) or is_auto(value):
            return Resume(None, 0, f"starting over from step 0: removed {len(gone)} checkpoint(s) from {output_dir} "
                                   "(overwrite_output_dir)")
    if is_none(value):
        return Resume(None, 0, "starting from step 0 (resume_from_checkpoint: none)")
    if is_auto(value):
        path, skipped = newest_complete_checkpoint(output_dir)
        return _resume_at(path, skipped, output_dir, why="auto")
    check_resume_value(value, output_dir)
    return _resume_at(str(value), [], output_dir, why="resume_from_checkpoint")


def _resume_at(path: str | None, skipped: list[str], output_dir: str, *, why: str) -> Resume:
    if path is None:
        return Resume(None, 0, f"starting from step 0: no complete checkpoint in {output_dir} ({why})", tuple(skipped))
    step = checkpoint_step(path)
    name = os.path.basename(os.path.normpath(path))
    return Resume(path, step, f"resuming from step {step} ({name}; {why})", tuple(skipped))


def resume_point(value, output_dir: str, *, overwrite: bool = False, restart_count: int | None = None) -> Resume:
    """Where this run starts, the same on every rank (collective once ``torch.distributed`` is initialized:
    call it on every rank, after the process group exists). Logs the decision on rank 0."""
    import torch.distributed as dist

    if restart_count is None:
        restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if group else 0
    decision = [decide(value, output_dir, overwrite=overwrite, restart_count=restart_count) if rank == 0 else None]
    if group:
        dist.broadcast_object_list(decision, src=0)
    resume = decision[0]
    if rank == 0:
        for problem in resume.skipped:
            logger.warning(f"skipped an incomplete checkpoint: {problem}")
        logger.info(resume.message)
    return resume


# ------------------------------------------------------------------------------------------ the tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def resume_candidate(value, output_dir: str, *, overwrite: bool = False) -> str | None:
    """The checkpoint a first attempt would resume from (:func:`decide` without deleting anything)."""
    if is_none(value) or (overwrite and is_auto(value)):
        return None
    if is_auto(value):
        return newest_complete_checkpoint(output_dir)[0]
    return str(value)


def check_same_tokenizer(checkpoint: str, tokenizer) -> None:
    """A ValueError when ``checkpoint`` holds a tokenizer whose vocabulary or special tokens differ from
    ``tokenizer``'s (a tokenizer or its directory); nothing to check when it saved none."""
    if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in _TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "the run's tokenizer")
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    saved = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ours, theirs = tokenizer.get_vocab(), saved.get_vocab()
    differ = sum(1 for token, i in theirs.items() if ours.get(token) != i) + sum(1 for t in ours if t not in theirs)
    special = {k: (getattr(saved, k, None), getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token")}
    special = {k: v for k, v in special.items() if v[0] != v[1] and v[0] is not None}
    if differ or special:
        what = (f"{differ} token ids differ (vocabularies of {len(theirs)} and {len(ours)})" if differ else
                "special tokens differ: " + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in special.items()))
        raise ValueError(f"checkpoint {checkpoint} was trained with another tokenizer than {name!r}: {what}. Resume "
                         f"with the tokenizer it was saved with (tokenizer_name_or_path: {checkpoint}), or start over "
                         "(overwrite_output_dir, or resume_from_checkpoint: none)")
