"""Levers that change no math: Liger kernels on where they can run (one log line saying which
path), trl's activation offloading and PyTorch's expandable segments reaching the trainer."""

from __future__ import annotations

import pytest

from launcher.job.config import RunConfig
from training.arguments import Adjustments, build_sft_config, sft_kwargs
from training.levers import liger_decision


def run_config(tmp_path, **train) -> RunConfig:
    return RunConfig.model_validate(
        {"name": "levers", "run_id": "0123456789", "run_dir": str(tmp_path), "train": train}
    )


def test_liger_is_auto_by_default_and_off_on_this_cpu_said_once(tmp_path):
    run = run_config(tmp_path)
    assert run.train.use_liger_kernel == "auto"
    notes = Adjustments()
    config = build_sft_config(run, str(tmp_path), cuda=False, adjustments=notes)
    sft_kwargs(run, cuda=False, adjustments=notes)  # resolving twice still says it once
    assert config.use_liger_kernel is False
    liger_lines = [note for note in notes.notes if note.startswith("Liger kernels:")]
    assert liger_lines == ["Liger kernels: off (auto; no CUDA: they are Triton GPU kernels)"]


@pytest.mark.parametrize(
    ("setting", "cuda", "capability", "version", "on", "said"),
    [
        ("auto", True, (7, 5), "0.8.5", True, "on (auto; liger-kernel 0.8.5)"),  # a T4
        ("auto", True, (9, 0), None, False, "pip install liger-kernel"),
        ("auto", True, (6, 1), "0.8.5", False, "compute capability 6.1 < 7.0"),
        (True, False, None, "0.8.5", False, "no CUDA"),
        (False, True, (9, 0), "0.8.5", False, "off (train.use_liger_kernel: false)"),
    ],
)
def test_liger_runs_only_where_its_kernels_can(setting, cuda, capability, version, on, said):
    use, line = liger_decision(setting, cuda=cuda, capability=capability, liger_version=version)
    assert use is on
    assert line.startswith("Liger kernels: on" if on else "Liger kernels: off") and said in line


def test_explicit_yaml_values_are_accepted(tmp_path):
    assert run_config(tmp_path, use_liger_kernel=True).train.use_liger_kernel is True
    assert run_config(tmp_path, use_liger_kernel=False).train.use_liger_kernel is False
    with pytest.raises(ValueError, match="use_liger_kernel"):
        run_config(tmp_path, use_liger_kernel="sometimes")


def test_activation_offloading_reaches_sft_config_on_cuda_and_is_said_off_without(tmp_path):
    run = run_config(tmp_path, activation_offloading=True)
    assert sft_kwargs(run, cuda=True, adjustments=Adjustments())["activation_offloading"] is True
    notes = Adjustments()
    config = build_sft_config(run, str(tmp_path), cuda=False, adjustments=notes)
    assert config.activation_offloading is False
    assert "no CUDA: activation offloading off (nothing to offload to)" in notes.notes


def test_selective_checkpointing_reaches_trl(tmp_path):
    """`gradient_checkpointing: selective` is trl's SAC: checkpointing on, attention kept."""
    run = run_config(tmp_path, gradient_checkpointing="selective")
    config = build_sft_config(run, str(tmp_path), cuda=False, adjustments=Adjustments())
    assert config.gradient_checkpointing is True
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False, "selective": True}
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        run_config(tmp_path, gradient_checkpointing="sometimes")


@pytest.mark.slow
def test_selective_checkpointing_trains_the_same_numbers_as_full(tmp_path, tiny_plan):
    """A real tiny QLoRA training, full vs selective checkpointing: same losses step by step
    (it changes what is kept, not the math)."""
    from training_support import events, run_job, tail

    from launcher.job.storage import RunPaths

    losses = {}
    for mode in (True, "selective"):
        folder = tmp_path / str(mode)
        run = tiny_plan(folder, train={"max_steps": 3, "gradient_checkpointing": mode}).runs[0]
        log = folder / "train.log"
        assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=folder) == 0, tail(log)
        losses[mode] = [event["loss"] for event in events(run, "step")]
        said = "selective activation checkpointing: attention outputs kept in 2 of 2 checkpointed layers"
        assert (said in log.read_text()) is (mode == "selective"), tail(log)
    assert len(losses[True]) == 3
    assert losses["selective"] == pytest.approx(losses[True], rel=1e-4)
