"""Opt-in debug record of which examples every optimizer step trained on.

`QLAUNCH_RECORD_EXAMPLES=1` in a training job's environment makes the trainer append to
`<run dir>/examples-per-step.jsonl` (rank R > 0 of a data-parallel job: `examples-per-step.rankR.jsonl`):

    {"start": 18, "dataset": [0, 1, 2, ...]}                 each time training (re)starts
    {"step": 19, "epoch": 1, "examples": [7, 3]}             after each optimizer step

An example's index is its position in the training set the trainer holds (after tokenization;
with packing, the examples inside the packed rows, row after row). Examples are recognised by
their tokens, not by where the data loader says they came from, so the record shows what was
really trained: `dataset` lists every example's index (identical examples share the first one's),
`examples` the indices of the examples in that step's batches (all micro-batches, this rank).
A step recorded twice (a job killed after a step but before its checkpoint, then resumed from an
older one) was trained twice; the later line is the one the final adapter kept.

The keys travel with each batch as one extra tensor, which the trainer takes out before the
model sees the batch, so the record also works with data loader worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ENV = "QLAUNCH_RECORD_EXAMPLES"
FILE_NAME = "examples-per-step.jsonl"
BATCH_KEY = "qlaunch_example_keys"


def record_requested() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def record_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / (FILE_NAME if rank == 0 else FILE_NAME.replace(".jsonl", f".rank{rank}.jsonl"))


def example_keys(row: dict[str, Any]) -> list[int]:
    """One content key per example in a (possibly packed) tokenized row."""
    ids = [int(t) for t in row["input_ids"]]
    lengths = row.get("seq_lengths") or [len(ids)]
    keys, at = [], 0
    for length in lengths:
        length = int(length)
        digest = hashlib.blake2b(repr(ids[at : at + length]).encode(), digest_size=7).digest()
        keys.append(int.from_bytes(digest, "big"))  # < 2**56: fits an int64 tensor
        at += length
    return keys


class KeyedCollator:
    """Wraps the trainer's collator: the batch also carries its examples' keys."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(rows)
        keys = [key for row in rows for key in example_keys(row)]
        batch[BATCH_KEY] = torch.tensor(keys, dtype=torch.long)
        return batch


class ExampleRecord(TrainerCallback):
    def __init__(self, path: Path, epoch_of) -> None:
        self.path = Path(path)
        self.epoch_of = epoch_of  # () -> index of the epoch being trained
        self.dataset = None  # the training set; the trainer sets it when it builds the loader
        self.index: dict[int, int] = {}
        self.pending: list[int] = []

    def take(self, inputs: dict[str, Any]) -> None:
        """Remove the keys from a batch about to be trained on, remembering them."""
        keys = inputs.pop(BATCH_KEY, None)
        if keys is not None:
            self.pending.extend(int(k) for k in keys.tolist())

    def on_train_begin(self, args, state, control, **kwargs):
        self.index, order = {}, []
        for row in self.dataset if self.dataset is not None else []:
            for key in example_keys(row):
                order.append(self.index.setdefault(key, len(order)))
        self.pending = []
        self._write({"start": state.global_step, "dataset": order})
        return control

    def on_step_end(self, args, state, control, **kwargs):
        examples = [self.index.get(key, -1) for key in self.pending]  # -1: not in the training set
        self.pending = []
        self._write({"step": state.global_step, "epoch": self.epoch_of(), "examples": examples})
        return control

    def _write(self, line: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
