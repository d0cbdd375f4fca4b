"""trl's SFTTrainer with checkpoints that appear only when complete, and a data order that a
resumed run replays exactly (training/sampling.py says why transformers' does not)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers.trainer_utils import has_length, rotate_checkpoints
from trl import SFTTrainer

from .checkpoints import publish, staging_dir
from .example_record import ExampleRecord, KeyedCollator
from .sampling import EpochCallback, EpochSampler, example_lengths

# Strategies whose order EpochSampler reproduces; others ("sequential" needs nothing,
# "batch_rebalance") keep transformers' sampler.
SEEDED_STRATEGIES = ("random", "group_by_length")


class AtomicCheckpointTrainer(SFTTrainer):
    """Each checkpoint is written into `.tmp-checkpoint-<step>/` and renamed when complete.

    `on_checkpoint(step, path)` is called (main process) once a checkpoint is visible.
    The training order of each epoch depends only on (seed, epoch): see training/sampling.py.
    `record_examples_to(path)` turns on the debug record of training/example_record.py.
    """

    on_checkpoint: Callable[[int, Path], None] | None = None
    example_record: ExampleRecord | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_sampler: EpochSampler | None = None
        self._epoch_callback = EpochCallback(lambda: self._epoch_sampler)
        self.add_callback(self._epoch_callback)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        if dataset is None or not has_length(dataset) or strategy not in SEEDED_STRATEGIES:
            self._epoch_sampler = None
            return super()._get_train_sampler(train_dataset)
        lengths = None
        if strategy == "group_by_length":
            names = getattr(self.processing_class, "model_input_names", None) or ["input_ids"]
            lengths = example_lengths(dataset, names[0], self.args.length_column_name)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Grouped like transformers does: one length group per optimizer step of one process.
        group_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        self._epoch_sampler = EpochSampler(len(dataset), seed, lengths, group_size)
        return self._epoch_sampler

    def record_examples_to(self, path: Path) -> None:
        self.example_record = ExampleRecord(path, lambda: self._epoch_callback.epoch)
        self.add_callback(self.example_record)

    def get_train_dataloader(self):
        if self.example_record is None:
            return super().get_train_dataloader()
        collate = self.data_collator
        self.data_collator = KeyedCollator(collate)
        self.example_record.dataset = self.train_dataset
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, model, inputs, *args, **kwargs):
        if self.example_record is not None:
            self.example_record.take(inputs)  # the keys are not a model input
        return super().training_step(model, inputs, *args, **kwargs)

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
