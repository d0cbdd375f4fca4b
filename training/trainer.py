"""trl's SFTTrainer with checkpoints that appear only when complete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers.trainer_utils import rotate_checkpoints
from trl import SFTTrainer

from .checkpoints import publish, staging_dir


class AtomicCheckpointTrainer(SFTTrainer):
    """Each checkpoint is written into `.tmp-checkpoint-<step>/` and renamed when complete.

    `on_checkpoint(step, path)` is called (main process) once a checkpoint is visible.
    """

    on_checkpoint: Callable[[int, Path], None] | None = None

    def log(self, logs, *args, **kwargs) -> None:
        if "train_runtime" in logs and self.state.global_step < self.state.max_steps:
            # The summary of an attempt stopped early (preemption). Right after it transformers
            # loads the best model and, with save_total_limit 1, deletes every other checkpoint:
            # also the one the next attempt resumes from. That checkpoint's trainer state still
            # names the best one, so the next attempt knows it.
            self.state.best_model_checkpoint = None
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        checkpoints = Path(self.args.output_dir)
        staging = staging_dir(checkpoints, step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(checkpoints)
        # Every rank writes its own RNG state into the folder: all must be done before the rename.
        self.accelerator.wait_for_everyone()
        final = checkpoints / f"checkpoint-{step}"
        if self.state.best_model_checkpoint == str(staging / final.name):
            # transformers recorded the staging path as the best checkpoint: point it (and the
            # saved trainer state a resume reads) at the published folder instead.
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staging / final.name / "trainer_state.json"))
        if self.args.should_save:
            publish(staging / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            # The best checkpoint (load_best_model_at_end) is never rotated away.
            rotate_checkpoints(
                str(checkpoints),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
            if self.on_checkpoint is not None:
                self.on_checkpoint(step, final)
        self.accelerator.wait_for_everyone()


def keep_trainable_fp32(model) -> int:
    """Cast trainable (LoRA) parameters back to float32; returns how many were cast.

    trl casts QLoRA adapter weights to bf16. With fp16 mixed precision (a T4 has no bf16) the
    GradScaler cannot unscale bf16 gradients, and without CUDA bf16 adapters only cost speed and
    precision; the original QLoRA notebook trained fp32 adapters.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
