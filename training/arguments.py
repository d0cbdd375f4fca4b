"""`train:` (notebook knob names) → trl 1.x `SFTConfig` keywords, adjusted to the machine.

Renames for transformers 5 / trl 1: group_by_length → train_sampling_strategy,
warmup_ratio → warmup_steps (a float below 1 is a ratio), max_seq_length → max_length.
Without CUDA: fp32 compute, no fp16/bf16, CUDA-only (paged / bitsandbytes) optimizers replaced
by torch's AdamW, each said once in the log. Liger kernels and activation offloading are
resolved against the machine in training/levers.py (one log line each).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.recipe_checks import RESERVED_SFT_ARGS, did_you_mean  # checked at plan time too

from . import levers
from .tracking import tracked_run_name

# Optimizers that need CUDA (bitsandbytes' paged/8-bit ones) → what to use without it.
PLAIN_TORCH_OPTIMIZER = "adamw_torch"


@dataclass
class Adjustments:
    """Changes made to the recipe because of the machine, each logged once."""

    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


def world_size() -> int:
    """Processes of this data-parallel job (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_only_optimizer(name: str) -> bool:
    name = name.lower()
    return name.startswith("paged_") or "bnb" in name or "8bit" in name or name in {"lion_32bit", "rmsprop_32bit"}


def sft_kwargs(
    run: RunConfig, *, cuda: bool, adjustments: Adjustments, completion_only_loss: bool | None = None
) -> dict[str, Any]:
    """`completion_only_loss`: what the job resolved from the data (default: the run's value,
    which the plan resolved where it could; None leaves it to trl, which masks prompts exactly
    when the dataset has prompt/completion columns)."""
    t = run.train
    if completion_only_loss is None:
        completion_only_loss = t.completion_only_loss
    fp16, bf16, optim = t.fp16, t.bf16, t.optim
    if not cuda:
        if fp16 or bf16:
            adjustments.note(f"no CUDA: {'fp16' if fp16 else 'bf16'} mixed precision off, computing in float32")
            fp16 = bf16 = False
        if cuda_only_optimizer(optim):
            adjustments.note(f"no CUDA: optimizer {optim} needs CUDA, using {PLAIN_TORCH_OPTIMIZER}")
            optim = PLAIN_TORCH_OPTIMIZER
    kwargs: dict[str, Any] = {
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "optim": optim,
        "max_grad_norm": t.max_grad_norm,
        # A float below 1 is a fraction of the total steps in transformers 5.
        "warmup_steps": min(float(t.warmup_ratio), 0.999999),
        "lr_scheduler_type": t.lr_scheduler_type,
        "train_sampling_strategy": "group_by_length" if t.group_by_length else "random",
        "fp16": fp16,
        "bf16": bf16,
        "packing": t.packing,
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "dataloader_num_workers": t.dataloader_num_workers,
        "dataloader_pin_memory": cuda,
        "dataset_text_field": "text",
        # Answer-only loss: the dataset has prompt/completion columns and trl masks the prompt.
        "completion_only_loss": completion_only_loss,
        # tokens/s in progress events counts real tokens, not padding.
        "include_num_input_tokens_seen": "non_padding",
        # TensorBoard is written by training.tracking's own callback (it purges replayed steps).
        "report_to": [name for name in run.tracking.report_to if name != "tensorboard"] or "none",
        "run_name": tracked_run_name(run),
        # Progress goes to progress events; tqdm's carriage returns bloat logs on shared storage.
        "disable_tqdm": True,
    }
    # transformers 5.x renamed gradient_checkpointing (the old name still works, with a warning).
    kwargs[_pick_field("activation_checkpointing", "gradient_checkpointing")] = bool(t.gradient_checkpointing)
    kwargs.update(levers.resolve(t, cuda=cuda, adjustments=adjustments))
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks for LoRA
        # (parameters "marked ready twice") and needs inputs that require grad. `selective` is
        # trl's key for its selective checkpointing (the attention output is kept).
        checkpointing = {"use_reentrant": False}
        if t.gradient_checkpointing == "selective":
            checkpointing["selective"] = True
        kwargs[_pick_field("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")] = checkpointing
    if not cuda:
        # Under torchrun without CUDA this makes accelerate a gloo data-parallel job (MULTI_CPU);
        # without it every process believes it is the only one and trains on all the data.
        kwargs["use_cpu"] = True
    if world_size() > 1:
        # Every LoRA parameter gets a gradient each step: skip DDP's unused-parameter search
        # (a full graph walk per step, and it fails with non-reentrant checkpointing).
        kwargs["ddp_find_unused_parameters"] = False
    if t.max_seq_length is not None:
        kwargs["max_length"] = t.max_seq_length
    if run.dataset.test_size:
        kwargs["per_device_eval_batch_size"] = t.per_device_train_batch_size
    if t.eval_strategy != "no":
        kwargs["eval_strategy"] = t.eval_strategy
        if t.eval_steps is not None:
            kwargs["eval_steps"] = t.eval_steps
        kwargs["load_best_model_at_end"] = t.load_best_model_at_end
        if t.metric_for_best_model is not None:
            kwargs["metric_for_best_model"] = t.metric_for_best_model
    return {**kwargs, **checked_sft_args(run)}


def checked_sft_args(run: RunConfig) -> dict[str, Any]:
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for key in run.train.sft_args:
        if key in RESERVED_SFT_ARGS:
            raise ConfigError(f"train.sft_args.{key}: set by qlaunch ({RESERVED_SFT_ARGS[key]})")
        if key not in known:
            raise ConfigError(
                f"train.sft_args.{key}: unknown SFTConfig argument (trl {_trl_version()}){did_you_mean(key, known)}"
            )
    return dict(run.train.sft_args)


def build_sft_config(
    run: RunConfig,
    output_dir: str,
    *,
    cuda: bool,
    adjustments: Adjustments,
    completion_only_loss: bool | None = None,
):
    from trl import SFTConfig

    kwargs = sft_kwargs(run, cuda=cuda, adjustments=adjustments, completion_only_loss=completion_only_loss)
    try:
        return SFTConfig(output_dir=output_dir, **kwargs)
    except (ValueError, TypeError) as exc:
        keys = ", ".join(f"train.sft_args.{k}" for k in run.train.sft_args) or "train"
        raise ConfigError(f"train: trl's SFTConfig rejected the settings ({keys}): {exc}") from None


def _pick_field(preferred: str, fallback: str) -> str:
    from trl import SFTConfig

    return preferred if preferred in {f.name for f in dataclasses.fields(SFTConfig)} else fallback


def _trl_version() -> str:
    import trl

    return trl.__version__
