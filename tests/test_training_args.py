"""`train:` → trl SFTConfig: renamed knobs, CPU adjustments, and sft_args pass-through."""

from __future__ import annotations

import pytest

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from training.arguments import Adjustments, build_sft_config, sft_kwargs


def run_config(tmp_path, **train) -> RunConfig:
    return RunConfig.model_validate({"name": "args", "run_id": "0123456789", "run_dir": str(tmp_path), "train": train})


def test_notebook_knobs_map_to_transformers5_and_trl1_names(tmp_path):
    run = run_config(tmp_path, group_by_length=True, warmup_ratio=0.03, max_seq_length=256)
    config = build_sft_config(run, str(tmp_path / "checkpoints"), cuda=False, adjustments=Adjustments())
    assert config.train_sampling_strategy == "group_by_length"
    assert config.warmup_steps == pytest.approx(0.03)  # a float below 1 is a ratio
    assert config.max_length == 256
    assert config.output_dir == str(tmp_path / "checkpoints")
    assert config.include_num_input_tokens_seen == "non_padding"


def test_without_cuda_precision_and_paged_optimizer_are_replaced_and_said(tmp_path):
    run = run_config(tmp_path, fp16=True, optim="paged_adamw_32bit")
    notes = Adjustments()
    config = build_sft_config(run, str(tmp_path), cuda=False, adjustments=notes)
    assert (config.fp16, config.bf16, config.optim) == (False, False, "adamw_torch")
    assert notes.notes == [
        "no CUDA: fp16 mixed precision off, computing in float32",
        "no CUDA: optimizer paged_adamw_32bit needs CUDA, using adamw_torch",
        "Liger kernels: off (auto; no CUDA: they are Triton GPU kernels)",
    ]


def test_on_cuda_the_recipe_is_kept(tmp_path):
    run = run_config(tmp_path, fp16=True, optim="paged_adamw_32bit")
    notes = Adjustments()
    kwargs = sft_kwargs(run, cuda=True, adjustments=notes)
    assert (kwargs["fp16"], kwargs["bf16"], kwargs["optim"]) == (True, False, "paged_adamw_32bit")
    assert [note for note in notes.notes if not note.startswith("Liger kernels:")] == []


def test_sft_args_pass_through(tmp_path):
    run = run_config(tmp_path, sft_args={"neftune_noise_alpha": 5, "logging_steps": 3})
    config = build_sft_config(run, str(tmp_path), cuda=False, adjustments=Adjustments())
    assert config.neftune_noise_alpha == 5
    assert config.logging_steps == 3  # sft_args win over the mapped keys


def test_unknown_sft_arg_is_one_clear_error(tmp_path):
    run = run_config(tmp_path, sft_args={"not_a_knob": 1})
    with pytest.raises(ConfigError, match=r"^train\.sft_args\.not_a_knob: unknown SFTConfig argument"):
        build_sft_config(run, str(tmp_path), cuda=False, adjustments=Adjustments())


def test_sft_args_cannot_move_checkpoints(tmp_path):
    run = run_config(tmp_path, sft_args={"output_dir": "/elsewhere"})
    with pytest.raises(ConfigError, match=r"^train\.sft_args\.output_dir: set by qlaunch"):
        build_sft_config(run, str(tmp_path), cuda=False, adjustments=Adjustments())
