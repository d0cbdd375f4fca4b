"""Packed rows with per-example attention, for GPUs without FlashAttention-2 (a T4); padding-free
micro-batches without packing (`use_padding_free`).

trl's packing (best-fit decreasing) fills rows of `max_length` tokens with whole examples, then its
padding-free collator concatenates the whole micro-batch into ONE row and relies on a varlen
kernel to keep examples apart. Without FlashAttention-2 that row goes through SDPA with a
block-diagonal mask over all of it: attention work grows with (batch × max_length)², and most of
it is masked out. This collator keeps the packed rows apart instead: a [rows, max_length] batch
whose position ids restart at every example and with no attention mask, from which transformers
builds each row's block-diagonal causal mask (`find_packed_sequence_indices`). Attention work is
rows × max_length², the same tokens are trained, and no token sees another example.

The first token of each example gets no label (as trl does): the previous example's last token
does not learn to predict it. A row's padding tail is one more "example" whose labels are all
ignored. Answer-only loss arrives as the `labels` trl built while preparing the dataset (-100 over
each prompt; older trl versions passed `completion_mask` / `assistant_masks` instead): both are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PackedRowsCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = len(examples)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, width), -100, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            n = len(ids)
            lengths = example.get("seq_lengths") or [n]
            input_ids[row, :n] = ids
            row_labels = (
                torch.as_tensor(example["labels"], dtype=torch.long).clone() if "labels" in example else ids.clone()
            )
            for key in ("completion_mask", "assistant_masks"):
                if key in example:
                    row_labels[torch.as_tensor(example[key]) == 0] = -100
            at = 0
            for length in lengths:
                position_ids[row, at : at + length] = torch.arange(length)
                row_labels[at] = -100
                at += length
            labels[row, :n] = row_labels
            if n < width:
                position_ids[row, n:] = torch.arange(width - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def use_packed_rows(trainer, model) -> bool:
    """Swap trl's flattening padding-free collator for packed rows when the model's attention
    has no varlen kernel (anything but FlashAttention). Returns whether it did."""
    if not (getattr(trainer.args, "packing", False) and getattr(trainer, "padding_free", False)):
        return False
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if "flash" in attention:
        return False
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    trainer.data_collator = PackedRowsCollator(tokenizer.pad_token_id)
    return True


def use_padding_free(trainer) -> None:
    """Without packing: trl's padding-free collator instead of its padding one. Each micro-batch's
    examples (truncated to max_length by trl's dataset preparation, as before) are concatenated
    into one row with position ids restarting at every example and no attention mask, from which
    transformers builds the block-diagonal causal mask (SDPA, eager) or the varlen boundaries
    (FlashAttention). The label of each example's first token is ignored, which is what shifting
    does to a padded row anyway: the same tokens are predicted from the same context, so each
    example's loss, and the batch's token-averaged loss, equal the padded batch's. trl itself
    refuses `padding_free` without packing when max_length is set (it would not truncate); here
    trl prepares and truncates the dataset as for padded batches, and only the collator changes."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    trainer.data_collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id,
        padding_free=True,
        pad_to_multiple_of=getattr(trainer.args, "pad_to_multiple_of", None),
    )
    trainer.padding_free = True
