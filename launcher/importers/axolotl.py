"""Axolotl YAML → qlaunch keys (the QLoRA subset; every other key becomes a warning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..job.errors import ConfigError
from .core import Imported, experiment_name, yaml_scalar

# Axolotl key → qlaunch key, carried over as is.
DIRECT = {
    "base_model": "model.name_or_path",
    "revision_of_model": "model.revision",
    "tokenizer_config": "model.tokenizer",
    "trust_remote_code": "model.trust_remote_code",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "sequence_len": "train.max_seq_length",
    "sample_packing": "train.packing",
    "micro_batch_size": "train.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "num_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate",
    "optimizer": "train.optim",
    "lr_scheduler": "train.lr_scheduler_type",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "group_by_length": "train.group_by_length",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "val_set_size": "dataset.test_size",
    "default_system_message": "prompt.system_prompt",
    "dataloader_num_workers": "train.dataloader_num_workers",
}

# Axolotl key → a trl SFTConfig / TrainingArguments keyword (train.sft_args).
SFT_ARGS = {
    "warmup_steps": "warmup_steps",
    "eval_batch_size": "per_device_eval_batch_size",
    "eval_sample_packing": "eval_packing",
    "neftune_noise_alpha": "neftune_noise_alpha",
    "tf32": "tf32",
    "lr_scheduler_kwargs": "lr_scheduler_kwargs",
    "cosine_min_lr_ratio": None,  # listed as unmappable below
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon",
    "loss_watchdog_threshold": None,
}

TRACKERS = ("wandb_", "mlflow_", "comet_", "use_tensorboard", "use_wandb", "use_mlflow")
# Tracker keys with a home in qlaunch's `tracking:` section (the rest are warnings with a reason).
TRACKER_KEYS = {
    "wandb_project": "tracking.project",
    "wandb_entity": "tracking.wandb_entity",
    "mlflow_tracking_uri": "tracking.mlflow_uri",
}
TRACKER_NOT_MAPPED = {
    "wandb_name": "qlaunch names each tracked run <run id>-<grid values>, the same on every resume",
    "wandb_run_id": "qlaunch derives the W&B run id from the run id, so every attempt continues one run",
    "wandb_watch": "not supported (gradients and weights are not logged)",
    "wandb_log_model": "not supported: the adapter is in <run dir>/adapter",
    "mlflow_experiment_name": "qlaunch's MLflow experiment is the experiment name",
    "mlflow_run_name": "qlaunch names each tracked run <run id>-<grid values>",
}

# Axolotl's Liger plugin switches: qlaunch has one (train.use_liger_kernel, auto by default).
LIGER_KEYS = (
    "liger_rope",
    "liger_rms_norm",
    "liger_glu_activation",
    "liger_swiglu",
    "liger_layer_norm",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
)

# Keys with a reason why they are not carried over.
NOT_MAPPED = {
    "base_model_config": "qlaunch reads the model config from model.name_or_path",
    "model_type": "transformers' Auto classes read the architecture from the model's config",
    "tokenizer_type": "transformers' Auto classes read the tokenizer class from the model",
    "is_llama_derived_model": "not needed: the architecture comes from the model's config",
    "strict": "Axolotl-only validation switch",
    "dataset_prepared_path": "qlaunch formats the dataset in the job (the datasets cache holds it)",
    "output_dir": "qlaunch writes each run under <storage.root>/<experiment>/<run id>",
    "pad_to_sequence_len": "qlaunch computes no padding: each micro-batch's examples in one row (train.padding_free: auto) or packed rows (train.packing)",
    "flash_attention": "qlaunch picks the attention kernel itself (SDPA; packed rows keep examples apart without FlashAttention-2)",
    "sdp_attention": "qlaunch uses SDPA already",
    "xformers_attention": "not supported; qlaunch uses SDPA",
    "deepspeed": "not supported: qlaunch trains data-parallel with accelerate (resources.nodes, gpus_per_node)",
    "fsdp": "not supported: qlaunch trains data-parallel with accelerate",
    "fsdp_config": "not supported: qlaunch trains data-parallel with accelerate",
    "special_tokens": "qlaunch uses the tokenizer's special tokens as they are (pad: trl picks pad or EOS)",
    "tokens": "adding tokens is not supported",
    "resume_from_checkpoint": "every qlaunch run resumes from its newest complete checkpoint by itself",
    "auto_resume_from_checkpoints": "every qlaunch run resumes from its newest complete checkpoint by itself",
    "local_rank": "set by the launcher",
    "debug": "Axolotl-only",
    "early_stopping_patience": "not supported (set train.sft_args and a callback is not possible from YAML)",
    "evals_per_epoch": "no SFTConfig equivalent: set train.eval_strategy: steps and train.eval_steps",
    "saves_per_epoch": "no SFTConfig equivalent: qlaunch saves every train.save_steps",
    "eval_steps": None,  # mapped below
    "lora_model_dir": "starting from an existing adapter is not supported",
    "lora_fan_in_fan_out": "not supported (Llama's linear layers do not need it)",
    "lora_modules_to_save": "not supported",
    "peft_use_dora": "DoRA is not supported",
    "peft_use_rslora": "rsLoRA is not supported",
    "hub_model_id": "qlaunch does not push to the hub; the adapter is in <run dir>/adapter",
    "hub_strategy": "qlaunch does not push to the hub",
    "push_dataset_to_hub": "qlaunch does not push to the hub",
    "chat_template_jinja": "a custom chat template is not supported: use the tokenizer's",
    "cosine_min_lr_ratio": "no SFTConfig equivalent (use train.sft_args.lr_scheduler_kwargs with cosine_with_min_lr)",
    "loss_watchdog_threshold": "Axolotl-only",
    "loss_watchdog_patience": "Axolotl-only",
    "xformers": "not supported",
    "gptq": "GPTQ models are not supported: qlaunch quantises with bitsandbytes NF4",
    "load_in_8bit": None,  # handled with adapter
}

TYPES = {
    "alpaca": "instruction",
    "sharegpt": "messages",
    "chat_template": "messages",
    "completion": "text",
}

CHAT_TEMPLATES = {"llama2": "llama2", "tokenizer_default": "chat_template"}


def src(key: str, value: Any) -> str:
    return f"axolotl {key}: {yaml_scalar(value)}"


def from_axolotl(path: Path) -> Imported:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected an Axolotl config (a mapping of keys), got {type(cfg).__name__}")
    out = Imported(tool="axolotl", origin=str(path), name=experiment_name(path.stem))
    if "base_model" not in cfg:
        raise ConfigError(f"{path}: base_model: missing (is this an Axolotl config?)")

    off: list[str] = []
    handled = {
        "adapter",
        "load_in_4bit",
        "load_in_8bit",
        "bnb_config_kwargs",
        "lora_target_modules",
        "lora_target_linear",
        "bf16",
        "fp16",
        "fp32",
        "gradient_checkpointing",
        "train_on_inputs",
        "datasets",
        "seed",
        "chat_template",
        "eval_steps",
        "eval_strategy",
        "evaluation_strategy",
        "plugins",
        *LIGER_KEYS,
    }
    for key, value in cfg.items():
        if key in DIRECT:
            if value is not None:
                out.set(DIRECT[key], value, src(key, value))
        elif key in SFT_ARGS and SFT_ARGS[key]:
            if value is not None:
                out.set(f"train.sft_args.{SFT_ARGS[key]}", value, src(key, value))
        elif key in handled:
            continue
        elif key.startswith(TRACKERS):
            if value in (None, False, ""):
                off.append(key)
        elif value in (None, False, "", [], {}):
            off.append(key)
        elif key in NOT_MAPPED:
            out.warn(f"{key}: {yaml_scalar(value)}: not mapped: {NOT_MAPPED[key]}")
        else:
            out.warn(f"{key}: {yaml_scalar(value)}: not mapped: unknown to the importer")

    _adapter(cfg, out)
    _lora_targets(cfg, out)
    _liger(cfg, out)
    _precision(cfg, out)
    if cfg.get("gradient_checkpointing") is not None:
        value = cfg["gradient_checkpointing"]
        if isinstance(value, bool):
            out.set("train.gradient_checkpointing", value, src("gradient_checkpointing", value))
        else:
            out.set("train.gradient_checkpointing", True, src("gradient_checkpointing", value))
            out.warn(f"gradient_checkpointing: {value}: imported as true (transformers' own checkpointing)")
    if cfg.get("train_on_inputs") is not None:
        value = bool(cfg["train_on_inputs"])
        out.set("train.completion_only_loss", not value, src("train_on_inputs", cfg["train_on_inputs"]))
    if cfg.get("seed") is not None:
        out.set("train.seed", cfg["seed"], src("seed", cfg["seed"]))
        out.set("dataset.seed", cfg["seed"], src("seed", cfg["seed"]) + " (also the eval split's)")
    _trackers(cfg, out, off)
    if cfg.get("chat_template"):
        template = CHAT_TEMPLATES.get(cfg["chat_template"])
        if template:
            out.set("prompt.template", template, src("chat_template", cfg["chat_template"]))
        else:
            out.set("prompt.template", "chat_template", src("chat_template", cfg["chat_template"]))
            out.warn(
                f"chat_template: {cfg['chat_template']}: Axolotl's named template is not shipped with qlaunch; "
                "imported as the tokenizer's own chat template (prompt.template: chat_template)"
            )
    _datasets(cfg.get("datasets"), out)
    _evaluation(cfg, out)
    if out.has("dataset.test_size") and out.get("dataset.test_size") and not out.has("train.eval_strategy"):
        out.warn(
            "val_set_size: qlaunch evaluates the held-out split once, after training (set "
            "train.eval_strategy/train.eval_steps for evaluations during training)"
        )
    if off:
        out.warn(f"off or empty in the source, nothing to carry over: {', '.join(off)}")
    out.note_unset_defaults()
    return out


def _evaluation(cfg: dict, out: Imported) -> None:
    """eval_strategy / eval_steps → train.eval_strategy / train.eval_steps (on dataset.test_size)."""
    key = "eval_strategy" if cfg.get("eval_strategy") is not None else "evaluation_strategy"
    strategy, steps = cfg.get(key), cfg.get("eval_steps")
    if strategy in (None, "", False, "no") and not steps:
        return
    source = src(key, strategy) if strategy not in (None, "") else src("eval_steps", steps)
    if not out.get("dataset.test_size"):
        out.warn(
            f"{source[len('axolotl ') :]}: not mapped: qlaunch evaluates on the held-out dataset.test_size, "
            "and val_set_size is 0 (set both to evaluate during training)"
        )
        return
    out.set("train.eval_strategy", strategy if strategy not in (None, "") else "steps", source)
    if steps:
        out.set("train.eval_steps", steps, src("eval_steps", steps))


def _trackers(cfg: dict, out: Imported, off: list[str]) -> None:
    """W&B, TensorBoard and MLflow settings → the `tracking:` section."""
    report = []
    wandb_mode = cfg.get("wandb_mode")
    if (cfg.get("use_wandb") or cfg.get("wandb_project")) and wandb_mode != "disabled":
        report.append(("wandb", "use_wandb" if cfg.get("use_wandb") else "wandb_project"))
    if cfg.get("use_tensorboard"):
        report.append(("tensorboard", "use_tensorboard"))
    if cfg.get("use_mlflow") or cfg.get("mlflow_tracking_uri"):
        report.append(("mlflow", "use_mlflow" if cfg.get("use_mlflow") else "mlflow_tracking_uri"))
    if report:
        out.set("tracking.report_to", [name for name, _ in report], ", ".join(src(key, cfg[key]) for _, key in report))
    for key, target in TRACKER_KEYS.items():
        if cfg.get(key) not in (None, ""):
            out.set(target, cfg[key], src(key, cfg[key]))
    if wandb_mode in ("online", "offline"):
        out.set("tracking.wandb_mode", wandb_mode, src("wandb_mode", wandb_mode))
    for key, value in cfg.items():
        if not key.startswith(TRACKERS) or value in (None, False, ""):
            continue
        if str(value).lower() in ("false", "none", "no"):
            off.append(key)
        elif key in TRACKER_NOT_MAPPED:
            out.warn(f"{key}: {yaml_scalar(value)}: not mapped: {TRACKER_NOT_MAPPED[key]}")
        elif key.startswith("comet_"):
            out.warn(
                f"{key}: {yaml_scalar(value)}: not mapped: Comet is not supported "
                "(tracking.report_to: tensorboard, wandb, mlflow)"
            )
        elif key not in TRACKER_KEYS and key not in ("use_wandb", "use_tensorboard", "use_mlflow", "wandb_mode"):
            out.warn(f"{key}: {yaml_scalar(value)}: not mapped: unknown to the importer (see the tracking: section)")


def _adapter(cfg: dict, out: Imported) -> None:
    adapter = cfg.get("adapter")
    if adapter == "qlora" or (adapter == "lora" and cfg.get("load_in_4bit")):
        source = src("adapter", adapter) if adapter == "qlora" else src("load_in_4bit", True)
        out.set("quantization.load_in_4bit", True, source)
        # Axolotl's 4-bit defaults: NF4 with double quantisation (bnb_config_kwargs overrides them).
        kwargs = {
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            **(cfg.get("bnb_config_kwargs") or {}),
        }
        for key, value in kwargs.items():
            origin = (
                f"axolotl bnb_config_kwargs.{key}: {yaml_scalar(value)}"
                if key in (cfg.get("bnb_config_kwargs") or {})
                else f"{source} (Axolotl's default {key})"
            )
            if key in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
                out.set(f"quantization.{key}", value, origin)
            else:
                out.warn(
                    f"bnb_config_kwargs.{key}: {yaml_scalar(value)}: not mapped (qlaunch sets only quant type and double quantisation)"
                )
    elif adapter == "lora":
        out.set("quantization.load_in_4bit", False, src("adapter", adapter) + " (LoRA without 4-bit loading)")
        if cfg.get("load_in_8bit"):
            out.warn(
                "load_in_8bit: true: not mapped (qlaunch has no 8-bit loading): LoRA on the unquantised "
                "model instead, or set adapter: qlora for 4-bit"
            )
    else:
        out.warn(
            f"adapter: {yaml_scalar(adapter)}: qlaunch trains LoRA adapters only; imported as QLoRA "
            "(4-bit NF4 + LoRA), not a full fine-tune"
        )
    if cfg.get("load_in_8bit") and adapter == "qlora":
        out.warn("load_in_8bit: true: ignored, adapter: qlora loads in 4 bits")


def _lora_targets(cfg: dict, out: Imported) -> None:
    modules = cfg.get("lora_target_modules")
    if cfg.get("lora_target_linear"):
        out.set("lora.target_modules", "all-linear", src("lora_target_linear", True))
        if modules:
            out.warn(f"lora_target_modules: {yaml_scalar(modules)}: covered by lora_target_linear (all-linear)")
    elif modules:
        out.set(
            "lora.target_modules",
            modules if isinstance(modules, list) else [modules],
            src("lora_target_modules", modules),
        )


def _liger(cfg: dict, out: Imported) -> None:
    """Liger: qlaunch's default (`auto`) already turns RMSNorm/RoPE/SwiGLU on where liger-kernel is
    installed; an explicit `true` from the source pins it, `false` everywhere turns it off. The loss
    never builds full logits in qlaunch (trl's chunked LM head), so the cross-entropy switches add
    nothing. Other plugins are Axolotl's own."""
    on = [key for key in LIGER_KEYS[:5] if cfg.get(key)]
    if on:
        out.set("train.use_liger_kernel", True, src(on[0], True) + (f" (and {', '.join(on[1:])})" if on[1:] else ""))
    elif any(cfg.get(key) is False for key in LIGER_KEYS[:5]):
        out.set("train.use_liger_kernel", False, src(next(k for k in LIGER_KEYS[:5] if cfg.get(k) is False), False))
    for key in LIGER_KEYS[5:]:
        if cfg.get(key):
            out.warn(
                f"{key}: true: not needed: trl's SFTTrainer computes the loss through its chunked LM head "
                "(the full logits are never built)"
            )
    plugins = [p for p in (cfg.get("plugins") or []) if "liger" not in str(p).lower()]
    if plugins:
        out.warn(f"plugins: {yaml_scalar(plugins)}: not mapped (Axolotl plugins; Liger is train.use_liger_kernel)")


def _precision(cfg: dict, out: Imported) -> None:
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    if bf16 in (True, "auto", "full"):
        out.set("train.bf16", True, src("bf16", bf16))
        if bf16 == "auto":
            out.warn("bf16: auto: imported as true (qlaunch computes in float32 where there is no CUDA, by itself)")
        if bf16 == "full":
            out.warn("bf16: full: imported as bf16 mixed precision (pure-bf16 training is not supported)")
        dtype = "bfloat16"
    elif fp16:
        out.set("train.fp16", True, src("fp16", fp16))
        dtype = "float16"
    elif cfg.get("fp32"):
        dtype = "float32"
    else:
        return
    if out.get("quantization.load_in_4bit"):
        # Axolotl computes the 4-bit layers in the training dtype.
        out.set(
            "quantization.bnb_4bit_compute_dtype",
            dtype,
            f"axolotl {'bf16' if dtype == 'bfloat16' else 'fp16' if dtype == 'float16' else 'fp32'} (Axolotl's 4-bit compute dtype is the training dtype)",
        )


def _datasets(datasets: Any, out: Imported) -> None:
    if not datasets:
        out.warn("datasets: none in the source: qlaunch's default dataset applies (mlabonne/guanaco-llama2-1k)")
        return
    if not isinstance(datasets, list) or not isinstance(datasets[0], dict):
        out.warn(f"datasets: {yaml_scalar(datasets)}: not mapped (expected a list of {{path, type}})")
        return
    if len(datasets) > 1:
        rest = ", ".join(str(d.get("path")) for d in datasets[1:] if isinstance(d, dict))
        out.warn(f"datasets: qlaunch trains on one dataset: imported the first, not {rest}")
    ds = datasets[0]
    where = "datasets[0]"
    path = ds.get("path")
    if ds.get("data_files"):
        files = ds["data_files"]
        path = files[0] if isinstance(files, list) else files
        out.set("dataset.path", path, f"axolotl {where}.data_files: {yaml_scalar(ds['data_files'])}")
        if isinstance(files, list) and len(files) > 1:
            out.warn(f"{where}.data_files: only the first file is imported ({path})")
    elif path:
        out.set("dataset.path", path, f"axolotl {where}.path: {yaml_scalar(path)}")
    if ds.get("split"):
        out.set("dataset.split", ds["split"], f"axolotl {where}.split: {yaml_scalar(ds['split'])}")
    kind = ds.get("type")
    base = kind.split(":")[0] if isinstance(kind, str) else kind
    fmt = TYPES.get(kind) or (TYPES.get(base) if base == "sharegpt" else None)
    if fmt is None:
        out.warn(
            f"{where}.type: {yaml_scalar(kind)}: not mapped (qlaunch reads alpaca, sharegpt, chat_template "
            "and completion data); dataset.format stays auto"
        )
    else:
        out.set("dataset.format", fmt, f"axolotl {where}.type: {yaml_scalar(kind)}")
    if fmt == "instruction":
        out.set("dataset.instruction_field", "instruction", f"axolotl {where}.type: alpaca (its instruction column)")
        out.set("dataset.input_field", "input", f"axolotl {where}.type: alpaca (its input column)")
        out.set("dataset.response_field", "output", f"axolotl {where}.type: alpaca (its output column)")
        out.warn(
            f"{where}.type: alpaca: rows are rendered in qlaunch's prompt.template "
            f"({out.get('prompt.template', 'llama2')}), not Axolotl's '### Instruction:' wording"
        )
    elif fmt == "messages":
        field = ds.get("field_messages") or ("conversations" if base == "sharegpt" else "messages")
        out.set(
            "dataset.messages_field",
            field,
            f"axolotl {where}.field_messages: {yaml_scalar(field)}"
            if ds.get("field_messages")
            else f"axolotl {where}.type: {kind} (Axolotl's default column)",
        )
        roles = ds.get("message_property_mappings") or {}
        role = roles.get("role") or ds.get("message_field_role")
        content = roles.get("content") or ds.get("message_field_content")
        if (role, content) not in (
            (None, None),
            ("role", "content"),
            ("from", "value"),
            ("role", None),
            (None, "content"),
            ("from", None),
            (None, "value"),
        ):
            out.warn(f"{where}: message keys {role!r}/{content!r}: qlaunch reads role/content or from/value")
        if not out.has("prompt.template"):
            out.set("prompt.template", "chat_template", f"axolotl {where}.type: {kind} (rendered with a chat template)")
        out.warn(
            f"{where}.type: {kind}: with answer-only loss, qlaunch scores the last answer of each "
            "conversation (earlier turns are context), where Axolotl scores every assistant turn"
        )
    elif fmt == "text":
        field = ds.get("field") or "text"
        out.set(
            "dataset.text_field",
            field,
            f"axolotl {where}.field: {yaml_scalar(field)}"
            if ds.get("field")
            else f"axolotl {where}.type: completion (its text column)",
        )
    known = {
        "path",
        "type",
        "split",
        "data_files",
        "ds_type",
        "field_messages",
        "message_property_mappings",
        "message_field_role",
        "message_field_content",
        "field",
        "roles_to_train",
        "train_on_eos",
    }
    for key, value in ds.items():
        if key in known:
            continue
        out.warn(f"{where}.{key}: {yaml_scalar(value)}: not mapped")
    if ds.get("roles_to_train") not in (None, ["assistant"], ["gpt"]):
        out.warn(f"{where}.roles_to_train: {yaml_scalar(ds['roles_to_train'])}: qlaunch trains on the last answer only")
    if (
        ds.get("ds_type")
        and not ds.get("data_files")
        and not str(path or "").endswith((".json", ".jsonl", ".csv", ".parquet"))
    ):
        out.warn(
            f"{where}.ds_type: {ds['ds_type']}: a local dataset needs a .jsonl/.json/.csv/.parquet path in qlaunch"
        )
