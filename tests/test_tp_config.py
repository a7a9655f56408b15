"""``--tp_config ds_config.json``: a DeepSpeed user's JSON drives TPTrainingArguments without DeepSpeed.

Building ``TrainingArguments`` with ``WORLD_SIZE`` > 1 makes accelerate join a process group, so
layouts bigger than this single process are checked by applying the file to arguments built for
one process (``configured``), with ``WORLD_SIZE`` set only while the file is applied.
"""

import json
import logging

import pytest

from tp_trainer import TPTrainingArguments
from tp_trainer.tp_config import apply_tp_config, read_tp_config

# The seed's configuration (its "..." placeholders filled in the way HF's DeepSpeed examples do).
SEED_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": "auto"},
    "ZeRO_optimization": {"stage": 1, "gather_16bit_weights_on_model_save": True},
    "tensor_parallel": {"autotp_size": 4},
}


@pytest.fixture
def write(tmp_path):
    def _write(cfg, name="ds_config.json"):
        path = tmp_path / name
        path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return str(path)
    return _write


def args(tmp_path, **kw):
    return TPTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **kw)


def configured(tmp_path, monkeypatch, path, *, world=8, **flags):
    """Arguments with explicit ``flags``, then ``path`` applied as if launched on ``world`` processes."""
    a = args(tmp_path)
    for name, value in flags.items():  # as if given on the command line of a bigger world
        setattr(a, name, value)
    a.tp_config = path
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", str(world))
        apply_tp_config(a)
    return a


@pytest.fixture
def tp_warnings():
    """Warnings of the tp_trainer.tp_config logger (transformers loggers do not propagate to caplog)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("tp_trainer.tp_config")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_the_seed_config_runs_unchanged(tmp_path, write, monkeypatch, tp_warnings):
    a = configured(tmp_path, monkeypatch, write(SEED_CONFIG))
    assert (a.tp_size, a.zero_stage, a.gather_16bit_weights_on_model_save) == (4, 1, True)
    assert a.parallel_active
    assert tp_warnings == []  # every key is either mapped or "auto"


def test_through_the_constructor(tmp_path, write, tp_warnings):
    a = args(tmp_path, tp_config=write({**SEED_CONFIG, "tensor_parallel": {"autotp_size": 1}}))
    assert (a.tp_size, a.zero_stage, a.gather_16bit_weights_on_model_save) == (1, 1, True)
    assert tp_warnings == []


def test_lowercase_spelling_and_mapped_training_keys(tmp_path, write, monkeypatch):
    cfg = {"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2},
           "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
           "bf16": {"enabled": True}, "train_batch_size": 3 * 2 * 4}
    a = configured(tmp_path, monkeypatch, write(cfg))
    assert (a.tp_size, a.zero_stage, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (2, 2, 3, 2)
    assert a.max_grad_norm == 0.5 and a.bf16 is True


def test_unsupported_keys_are_reported_by_name(tmp_path, write, monkeypatch, tp_warnings):
    cfg = {**SEED_CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "ZeRO_optimization": {"stage": 1, "overlap_comm": True},
           "tensor_parallel": {"autotp_size": 4, "tp_overlap": 1}}
    configured(tmp_path, monkeypatch, write(cfg))
    assert len(tp_warnings) == 1
    for key in ("optimizer", "ZeRO_optimization.overlap_comm", "tensor_parallel.tp_overlap"):
        assert key in tp_warnings[0]


def test_conflict_with_an_explicit_flag_is_an_error(tmp_path, write, monkeypatch):
    path = write({**SEED_CONFIG, "tensor_parallel": {"autotp_size": 1}})
    with pytest.raises(ValueError, match=r"zero_stage=1 but the arguments say zero_stage=2"):
        args(tmp_path, tp_config=path, zero_stage=2)
    with pytest.raises(ValueError, match=r"tp_size=4 but the arguments say tp_size=2"):
        configured(tmp_path, monkeypatch, write(SEED_CONFIG, "seed.json"), world=2, tp_size=2)
    with pytest.raises(ValueError, match=r"gather_16bit_weights_on_model_save=True but the arguments say .*=False"):
        args(tmp_path, tp_config=path, gather_16bit_weights_on_model_save=False)
    a = args(tmp_path, tp_config=path, zero_stage=1)  # the same value twice is no conflict
    assert a.zero_stage == 1


def test_train_batch_size_must_add_up(tmp_path, write, monkeypatch):
    cfg = {"tensor_parallel": {"autotp_size": 4}, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 16}
    with pytest.raises(ValueError, match=r"train_batch_size=16.*= 4"):  # 2 x 1 x (8 / 4)
        configured(tmp_path, monkeypatch, write(cfg))
    assert configured(tmp_path, monkeypatch, write({**cfg, "train_batch_size": 4})).tp_size == 4


def test_bad_files_and_values(tmp_path, write):
    with pytest.raises(ValueError, match="does not exist"):
        args(tmp_path, tp_config=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        args(tmp_path, tp_config=write('{"ZeRO_optimization": {"stage": 1, ...}}'))
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        args(tmp_path, tp_config=write({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ValueError, match="not divisible by tp_size=3"):
        args(tmp_path, tp_config=write({"tensor_parallel": {"autotp_size": 3}}))  # this world has 1 process


def test_parsed_like_any_other_field(tmp_path, write):
    from transformers import HfArgumentParser

    path = write({**SEED_CONFIG, "ZeRO_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 1}})
    (a,) = HfArgumentParser(TPTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "o"), "--tp_config", path, "--report_to", "none", "--use_cpu"])
    assert (a.tp_size, a.zero_stage) == (1, 2)


def test_reader_is_pure(write):
    values, unsupported, tbs = read_tp_config(write(SEED_CONFIG))
    assert values == {"zero_stage": 1, "gather_16bit_weights_on_model_save": True, "tp_size": 4}
    assert unsupported == [] and tbs is None
