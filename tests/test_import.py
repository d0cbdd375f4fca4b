"""`qlaunch import`: Axolotl Llama-2 QLoRA configs and the Meta guide's trl sft.py command line
become experiment files that load, and whose rendered SFTConfig carries the source's values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.grid import plan

DATA = Path(__file__).parent / "data"
AXOLOTL_CONFIGS = ["axolotl-llama2-qlora.yml", "axolotl-llama2-chat-guanaco-t4.yml"]

# The Meta Llama 2 fine-tuning guide's command (trl/examples/scripts/sft.py), with the usual extras.
SFT_PY = [
    "--model_name_or_path",
    "meta-llama/Llama-2-7b-hf",
    "--dataset_name",
    "timdettmers/openassistant-guanaco",
    "--load_in_4bit",
    "--use_peft",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "2",
    "--output_dir",
    "output/llama2-guanaco",
    "--learning_rate",
    "2e-4",
    "--report_to",
    "wandb",
    "--num_train_epochs",
    "1",
    "--max_length",
    "512",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_ratio",
    "0.03",
    "--lora_r",
    "64",
    "--lora_alpha",
    "16",
    "--lora_target_modules",
    "q_proj",
    "v_proj",
    "--logging_steps",
    "10",
    "--gradient_checkpointing",
    "--neftune_noise_alpha",
    "5",
]

# Axolotl key → (SFTConfig attribute, the value SFTConfig should hold for the source's value).
AXOLOTL_TO_SFT = {
    "micro_batch_size": ("per_device_train_batch_size", lambda v: v),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", lambda v: v),
    "num_epochs": ("num_train_epochs", float),
    "max_steps": ("max_steps", lambda v: v),
    "learning_rate": ("learning_rate", float),
    "optimizer": ("optim", lambda v: v),
    "lr_scheduler": ("lr_scheduler_type", lambda v: v),
    "warmup_steps": ("warmup_steps", lambda v: v),
    "warmup_ratio": ("warmup_steps", float),  # transformers 5: a float below 1 is a ratio
    "weight_decay": ("weight_decay", float),
    "max_grad_norm": ("max_grad_norm", float),
    "sequence_len": ("max_length", lambda v: v),
    "sample_packing": ("packing", lambda v: v),
    "bf16": ("bf16", lambda v: v in (True, "auto")),
    "fp16": ("fp16", bool),
    "tf32": ("tf32", lambda v: v),
    "gradient_checkpointing": ("gradient_checkpointing", lambda v: v),
    "group_by_length": ("train_sampling_strategy", lambda v: "group_by_length" if v else "random"),
    "logging_steps": ("logging_steps", lambda v: v),
    "save_steps": ("save_steps", lambda v: v),
    "save_total_limit": ("save_total_limit", lambda v: v),
    "eval_steps": ("eval_steps", lambda v: v),
    "seed": ("seed", lambda v: v),
    "train_on_inputs": ("completion_only_loss", lambda v: not v),
}

SFT_PY_TO_SFT = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-4,
    "num_train_epochs": 1.0,
    "max_length": 512,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "gradient_checkpointing": True,
    "neftune_noise_alpha": 5,
}


# SFTConfig refuses bf16/fp16 on a machine without a GPU, and the job swaps CUDA-only optimizers
# for torch's there: these are compared in the keywords build_sft_config passes on a GPU.
GPU_ONLY = {"bf16", "fp16", "optim"}


class Rendered:
    """The SFTConfig this machine renders, with the GPU's precision and optimizer."""

    def __init__(self, run, tmp_path):
        from training.arguments import Adjustments, build_sft_config, sft_kwargs

        self.config = build_sft_config(run, str(tmp_path / "ckpt"), cuda=False, adjustments=Adjustments())
        self.gpu = sft_kwargs(run, cuda=True, adjustments=Adjustments())

    def __getitem__(self, attribute):
        return self.gpu[attribute] if attribute in GPU_ONLY else plain(getattr(self.config, attribute))


def sft_config(run, tmp_path) -> Rendered:
    return Rendered(run, tmp_path)


def plain(value):
    return getattr(value, "value", value)  # transformers' enums (optim, scheduler)


def imported(tmp_path, *source: str) -> tuple[Path, str]:
    out = tmp_path / "imported.yaml"
    assert main(["import", "-o", str(out), *source]) == 0
    return out, out.read_text()


@pytest.mark.parametrize("name", AXOLOTL_CONFIGS)
def test_axolotl_config_becomes_an_experiment_with_the_same_training_values(tmp_path, name, capsys):
    source = yaml.safe_load((DATA / name).read_text())
    path, text = imported(tmp_path, str(DATA / name))
    (run,) = plan(path).runs
    config = sft_config(run, tmp_path)
    compared = 0
    for key, (attribute, expected) in AXOLOTL_TO_SFT.items():
        if source.get(key) is None:
            continue
        assert config[attribute] == expected(source[key]), f"{key} → SFTConfig.{attribute}"
        compared += 1
    assert compared >= 15
    # What SFTConfig does not hold: model, LoRA, 4-bit loading, data.
    assert run.model.name_or_path == source["base_model"]
    assert run.lora.r == source["lora_r"] and run.lora.alpha == source["lora_alpha"]
    assert run.lora.dropout == source["lora_dropout"]
    expected_targets = "all-linear" if source.get("lora_target_linear") else source["lora_target_modules"]
    assert run.lora.target_modules == expected_targets
    assert run.quantization.load_in_4bit is True
    assert run.quantization.bnb_4bit_compute_dtype == ("float16" if source.get("fp16") else "bfloat16")
    assert run.dataset.path == source["datasets"][0]["path"]
    assert run.dataset.test_size == source["val_set_size"]
    assert run.dataset.format == {"alpaca": "instruction", "chat_template": "messages"}[source["datasets"][0]["type"]]
    # Every set key is in the file with its source, and every unmappable one is a warning.
    for line in text.splitlines():
        if re.match(r"^\s+\w+: ", line) and not line.strip().startswith("#"):
            assert "# axolotl " in line, line
    warnings = capsys.readouterr().err
    for key, value in source.items():
        if key in ("output_dir", "flash_attention", "special_tokens", "model_type") and value:
            assert f"warning: {key}:" in warnings
    # Trackers and evaluation have homes (#33): tracking.*, train.eval_*; never train.sft_args.
    if source.get("wandb_project"):
        assert "wandb" in run.tracking.report_to and run.tracking.project == source["wandb_project"]
        assert run.tracking.wandb_entity == source.get("wandb_entity")
    if source.get("eval_steps") and source.get("val_set_size"):
        assert (run.train.eval_strategy, run.train.eval_steps) == ("steps", source["eval_steps"])
    assert not {"eval_strategy", "eval_steps"} & set(run.train.sft_args)
    assert "no tracker settings" not in warnings


def test_the_guides_sft_py_command_line_becomes_an_experiment(tmp_path, capsys):
    path, text = imported(tmp_path, "--", *SFT_PY)
    (run,) = plan(path).runs
    config = sft_config(run, tmp_path)
    for attribute, expected in SFT_PY_TO_SFT.items():
        assert config[attribute] == expected, attribute
    assert run.name == "llama2-guanaco"  # from --output_dir
    assert run.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert run.dataset.path == "timdettmers/openassistant-guanaco"
    assert run.quantization.load_in_4bit is True
    assert (run.lora.r, run.lora.alpha, run.lora.target_modules) == (64, 16, ["q_proj", "v_proj"])
    assert run.lora.dropout == 0.05  # trl ModelConfig's default, which sft.py --use_peft trains with
    assert "learning_rate: 0.0002  # sft.py --learning_rate 2e-4" in text
    err = capsys.readouterr().err
    assert run.tracking.report_to == ["wandb"] and "report_to: [wandb]  # sft.py --report_to wandb" in text
    assert "--report_to" not in err and "no tracker settings" not in err
    assert "warning: --output_dir output/llama2-guanaco: not mapped" in err


def test_older_guide_names_are_read(tmp_path):
    path, text = imported(
        tmp_path,
        "--",
        "python trl/examples/scripts/sft.py --model_name meta-llama/Llama-2-7b-hf "
        "--dataset_name timdettmers/openassistant-guanaco --load_in_4bit --use_peft --batch_size 4 "
        "--gradient_accumulation_steps 2 --log_with wandb",
    )
    (run,) = plan(path).runs
    assert run.train.per_device_train_batch_size == 4
    assert "# sft.py --batch_size 4" in text
    assert run.tracking.report_to == ["wandb"]  # --log_with
    assert (run.lora.r, run.lora.alpha) == (16, 32)  # trl's defaults, not qlaunch's


def test_check_shows_the_mapping_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["import", "--check", str(DATA / AXOLOTL_CONFIGS[0])]) == 0
    out = capsys.readouterr().out
    assert "lora.target_modules = all-linear" in out and "<- axolotl lora_target_linear: true" in out
    assert "train.completion_only_loss = true" in out
    assert "flash_attention: true: not mapped" in out
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "exp.yaml"
    out.write_text("keep me")
    assert main(["import", str(DATA / AXOLOTL_CONFIGS[0]), "-o", str(out)]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["import", str(DATA / AXOLOTL_CONFIGS[0]), "-o", str(out), "--force"]) == 0


def test_a_source_value_qlaunch_rejects_names_the_key_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "bad.yml"
    source.write_text("base_model: x\nadapter: qlora\nlora_r: 0\n")
    out = tmp_path / "exp.yaml"
    assert main(["import", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "bad.yml: not valid in qlaunch: axolotl lora_r: 0 → lora.r: Input should be greater than or equal to 1" in err
    )
    assert not out.exists()


def test_sharegpt_from_value_rows_are_read_as_messages(tmp_path):
    from launcher.job.config import RunConfig
    from training.formatting import format_row

    run = RunConfig.model_validate(
        {"name": "s", "run_id": "0123456789", "run_dir": str(tmp_path), "dataset": {"messages_field": "conversations"}}
    )
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert format_row(run, None, row, "messages") == "<s>[INST] Hi [/INST] Hello </s>"


def test_the_readme_shows_what_the_import_prints(tmp_path, capsys, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("$ qlaunch import qlora.yml -o llama2-qlora.yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qlora.yml").write_text((DATA / AXOLOTL_CONFIGS[0]).read_text())
    assert main(["import", "qlora.yml", "-o", "llama2-qlora.yaml"]) == 0
    printed = capsys.readouterr()
    assert block.splitlines() == printed.err.splitlines() + printed.out.splitlines()
    written = (tmp_path / "llama2-qlora.yaml").read_text()
    shown = readme.split("```yaml\n# Imported by `qlaunch import` from axolotl: qlora.yml\n", 1)[1].split("```", 1)[0]
    body = [line for line in shown.splitlines() if not line.startswith("#")]
    assert body == [line for line in written.splitlines() if not line.startswith("#")]


def test_sft_py_evaluation_flags_have_homes(tmp_path, capsys):
    path, text = imported(
        tmp_path,
        "--",
        *SFT_PY,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "50",
        "--load_best_model_at_end",
        "--metric_for_best_model",
        "eval_loss",
        "--report_to",
        "tensorboard,comet_ml",
    )
    (run,) = plan(path).runs
    assert (run.train.eval_strategy, run.train.eval_steps) == ("steps", 50)
    assert run.train.load_best_model_at_end is True and run.train.metric_for_best_model == "eval_loss"
    assert run.dataset.test_size == 0.05  # sft.py evaluated on a test split: held out here instead
    assert not set(run.train.sft_args) & {"eval_strategy", "eval_steps", "load_best_model_at_end"}
    assert run.tracking.report_to == ["tensorboard"]
    err = capsys.readouterr().err
    assert "warning: --report_to comet_ml: not mapped: qlaunch's trackers are tensorboard, wandb, mlflow" in err
    assert "warning: --eval_strategy: evaluated on dataset.test_size: 0.05" in err


@pytest.mark.parametrize("packing", [True, False])
def test_an_all_linear_axolotl_config_gets_the_fast_path(tmp_path, packing):
    """lora_target_linear: true with Axolotl's Liger plugin: all-linear LoRA, Liger on, and no padding
    computed: packed rows with sample_packing, one padding-free row per micro-batch without it."""
    from launcher.preflight import _liger, step_shape

    source = yaml.safe_load((DATA / "axolotl-llama2-qlora.yml").read_text())
    source.update(
        sample_packing=packing,
        sequence_len=2048,
        plugins=["axolotl.integrations.liger.LigerPlugin"],
        liger_rope=True,
        liger_rms_norm=True,
        liger_glu_activation=True,
        liger_fused_linear_cross_entropy=True,
    )
    config = tmp_path / "axolotl.yml"
    config.write_text(yaml.safe_dump(source))
    path, text = imported(tmp_path, str(config))
    assert "use_liger_kernel: true  # axolotl liger_rope: true" in text
    (run,) = plan(path).runs
    assert run.lora.target_modules == "all-linear" and _liger(run)
    step = step_shape(run)
    assert (step.packed, step.flattened, step.rows) == ((True, False, 2) if packing else (True, True, 1))
