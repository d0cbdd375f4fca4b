"""A trl `examples/scripts/sft.py` command line → qlaunch keys.

sft.py parses three dataclasses with HfArgumentParser: trl's ModelConfig (model, LoRA, 4-bit),
ScriptArguments (dataset) and SFTConfig (training). The names of older guides (`--model_name`,
`--batch_size`, `--seq_length`, `--log_with`) are read too.
"""

from __future__ import annotations

import shlex
from typing import Any

from ..job.errors import ConfigError
from .core import Imported, experiment_name

ALIASES = {
    "model_name": "model_name_or_path",
    "batch_size": "per_device_train_batch_size",
    "seq_length": "max_length",
    "max_seq_length": "max_length",
    "log_with": "report_to",
    "torch_dtype": "dtype",
    "evaluation_strategy": "eval_strategy",
}

DIRECT = {
    "model_name_or_path": "model.name_or_path",
    "model_revision": "model.revision",
    "trust_remote_code": "model.trust_remote_code",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "bnb_4bit_quant_type": "quantization.bnb_4bit_quant_type",
    "use_bnb_nested_quant": "quantization.bnb_4bit_use_double_quant",
    "dataset_name": "dataset.path",
    "dataset_train_split": "dataset.split",
    "dataset_text_field": "dataset.text_field",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "optim": "train.optim",
    "max_grad_norm": "train.max_grad_norm",
    "warmup_ratio": "train.warmup_ratio",
    "lr_scheduler_type": "train.lr_scheduler_type",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "fp16": "train.fp16",
    "bf16": "train.bf16",
    "max_length": "train.max_seq_length",
    "packing": "train.packing",
    "use_liger_kernel": "train.use_liger_kernel",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "dataloader_num_workers": "train.dataloader_num_workers",
    "completion_only_loss": "train.completion_only_loss",
    "eval_strategy": "train.eval_strategy",
    "eval_steps": "train.eval_steps",
    "load_best_model_at_end": "train.load_best_model_at_end",
    "metric_for_best_model": "train.metric_for_best_model",
}
# --report_to values with a home in `tracking.report_to`.
TRACKERS = ("tensorboard", "wandb", "mlflow")

HANDLED = {
    "use_peft",
    "load_in_4bit",
    "load_in_8bit",
    "dtype",
    "lora_target_modules",
    "report_to",
    "assistant_only_loss",
    "group_by_length",
    "train_sampling_strategy",
}

NOT_MAPPED = {
    "output_dir": "qlaunch writes each run under <storage.root>/<experiment>/<run id>",
    "overwrite_output_dir": "every qlaunch run resumes from its newest complete checkpoint",
    "resume_from_checkpoint": "every qlaunch run resumes from its newest complete checkpoint by itself",
    "config": "read the YAML's keys into the command line first",
    "dataset_config": "qlaunch loads the dataset's default configuration",
    "dataset_test_split": "qlaunch holds out dataset.test_size of the training split instead",
    "dataset_streaming": "qlaunch loads the split into memory",
    "attn_implementation": "qlaunch picks the attention kernel itself",
    "lora_modules_to_save": "not supported",
    "lora_target_parameters": "not supported",
    "use_rslora": "rsLoRA is not supported",
    "use_dora": "DoRA is not supported",
    "bnb_4bit_quant_storage": "not supported",
    "lora_task_type": "qlaunch trains CAUSAL_LM adapters",
    "push_to_hub": "qlaunch does not push to the hub; the adapter is in <run dir>/adapter",
    "hub_model_id": "qlaunch does not push to the hub",
    "run_name": "qlaunch names each tracked run <run id>-<grid values>, the same on every resume",
    "logging_dir": "logs go to <run dir>/train.log and progress.jsonl",
    "ignore_bias_buffers": "only for DDP with bias buffers; not needed",
    "per_device_eval_batch_size": None,  # passed through
}

# trl ModelConfig's LoRA defaults, which sft.py --use_peft trains with when the flags are absent.
TRL_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--key value`, `--key=value`, `--flag`, `--key a b` (a list) → ({key: value}, {key: the
    value as written}), in order."""
    # A pasted `python trl/examples/scripts/sft.py …` or `accelerate launch … sft.py …`.
    starts = [i for i, token in enumerate(argv) if token.endswith(".py")]
    if starts:
        argv = argv[starts[-1] + 1 :]
    parsed: dict[str, Any] = {}
    raw: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise ConfigError(f"sft.py arguments: {token!r}: expected --name [value]")
        key, eq, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            values = [inline]
            index += 1
        else:
            index += 1
            values = []
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
        raw[key] = " ".join(shlex.quote(v) for v in values)
        if not values:
            parsed[key] = True
        elif len(values) == 1:
            parsed[key] = parse_value(values[0])
        else:
            parsed[key] = [parse_value(v) for v in values]
    return parsed, raw


def from_sft_args(argv: list[str]) -> Imported:
    if len(argv) == 1 and " " in argv[0]:
        argv = shlex.split(argv[0])  # the whole command line as one quoted string
    args, raw = parse_args(argv)
    origin = "sft.py " + " ".join(shlex.quote(a) for a in argv)
    out = Imported(tool="trl sft.py", origin=origin)
    aliases: dict[str, str] = {}
    for old, new in ALIASES.items():
        if old in args and new not in args:
            args[new], raw[new], aliases[new] = args.pop(old), raw.pop(old), old

    def src(key: str) -> str:
        written = f"sft.py --{aliases.get(key, key)}"
        return f"{written} {raw[key]}" if raw[key] else written

    if "model_name_or_path" not in args:
        raise ConfigError("sft.py arguments: --model_name_or_path: missing (the model to fine-tune)")
    out.name = experiment_name(str(args.get("output_dir", "")).rstrip("/").split("/")[-1], "sft")

    for key, value in args.items():
        if key in DIRECT:
            out.set(DIRECT[key], value, src(key))
        elif key in HANDLED:
            continue
        elif key in NOT_MAPPED and NOT_MAPPED[key]:
            out.warn(f"{src(key)[len('sft.py ') :]}: not mapped: {NOT_MAPPED[key]}")
        else:
            out.set(
                f"train.sft_args.{key}",
                value,
                src(key) + " (passed to SFTConfig as is; its name is checked when the grid is planned)",
            )

    if args.get("use_peft"):
        for key, default in TRL_LORA_DEFAULTS.items():
            if key not in args:
                out.set(DIRECT[key], default, f"sft.py --use_peft (trl ModelConfig's default {key})")
    else:
        out.warn("--use_peft missing: sft.py would fine-tune every weight; qlaunch trains a LoRA adapter")
    if args.get("load_in_4bit"):
        out.set("quantization.load_in_4bit", True, src("load_in_4bit"))
    else:
        out.set("quantization.load_in_4bit", False, "sft.py without --load_in_4bit (the model is loaded unquantised)")
    if args.get("load_in_8bit"):
        out.warn("--load_in_8bit: not mapped (qlaunch has no 8-bit loading; use --load_in_4bit)")
    dtype = args.get("dtype")
    if dtype in ("float16", "bfloat16", "float32"):
        out.set("quantization.bnb_4bit_compute_dtype", dtype, src("dtype") + " (trl computes the 4-bit layers in it)")
    elif dtype is not None:
        out.warn(f"--dtype {dtype}: not mapped (qlaunch computes 4-bit layers in quantization.bnb_4bit_compute_dtype)")
    modules = args.get("lora_target_modules")
    if modules is not None:
        if modules == "all-linear" or modules == ["all-linear"]:
            out.set("lora.target_modules", "all-linear", src("lora_target_modules"))
        else:
            out.set(
                "lora.target_modules", modules if isinstance(modules, list) else [modules], src("lora_target_modules")
            )
    if "group_by_length" in args:
        out.set("train.group_by_length", bool(args["group_by_length"]), src("group_by_length"))
    elif "train_sampling_strategy" in args:
        out.set(
            "train.group_by_length",
            args["train_sampling_strategy"] == "group_by_length",
            src("train_sampling_strategy"),
        )
    if args.get("assistant_only_loss"):
        out.set("train.completion_only_loss", True, src("assistant_only_loss"))
        out.warn(
            "--assistant_only_loss: imported as train.completion_only_loss: true, masked by the rendered prompt "
            "(the last answer of a conversation is scored, earlier turns are context)"
        )
    _trackers(args, out, src)
    strategy = args.get("eval_strategy")
    if strategy not in (None, "no") and not out.has("dataset.test_size"):
        # sft.py evaluates on the dataset's test split; qlaunch on a held-out part of the training split.
        out.set(
            "dataset.test_size",
            0.05,
            src("eval_strategy") + " (sft.py's --dataset_test_split is not "
            "read: qlaunch holds out this fraction of the training split instead)",
        )
        out.warn(
            "--eval_strategy: evaluated on dataset.test_size: 0.05 of the training split (sft.py used the "
            "dataset's test split): set the fraction you want"
        )
    if "dataset_text_field" in args:
        out.set("dataset.format", "text", src("dataset_text_field") + " (a ready text column)")
    out.warn(
        "prompt.template: left at llama2 (Llama 2's chat format); sft.py renders conversational data with "
        "the tokenizer's chat template (set prompt.template: chat_template for that); text rows are "
        "trained as they are either way"
    )
    out.note_unset_defaults()
    return out


def _trackers(args: dict, out: Imported, src) -> None:
    """--report_to → tracking.report_to (tensorboard, wandb, mlflow); others are warnings."""
    report = args.get("report_to")
    if report in (None, "none", ["none"]):
        return
    names = [report] if isinstance(report, str) else list(report)
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    known = [name for name in names if name in TRACKERS]
    if known:
        out.set("tracking.report_to", known, src("report_to"))
    other = [name for name in names if name not in TRACKERS and name != "none"]
    if other:
        out.warn(
            f"--report_to {','.join(other)}: not mapped: qlaunch's trackers are {', '.join(TRACKERS)} "
            "(tracking.report_to)"
        )


__all__ = ["from_sft_args", "parse_args"]
