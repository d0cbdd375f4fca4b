"""Padding-free micro-batches (train.padding_free: auto, the default without packing): each
micro-batch's examples in one row, each attending only to itself, with the same examples per step
and the same loss per example as the notebook's padded batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.levers import padding_free_decision

ROOT = Path(__file__).resolve().parents[1]


def test_decision_follows_setting_packing_and_batch():
    assert padding_free_decision("auto", packing=False, batch_size=4, max_length=1024)[0] is True
    assert padding_free_decision(True, packing=False, batch_size=1, max_length=1024)[0] is True
    off, line = padding_free_decision("auto", packing=False, batch_size=1, max_length=1024)
    assert not off and "nothing is padded" in line
    off, line = padding_free_decision(False, packing=False, batch_size=4, max_length=1024)
    assert not off and "train.padding_free: false" in line
    off, line = padding_free_decision("auto", packing=True, batch_size=12, max_length=1024)
    assert not off and "packed rows" in line
    # a row that could hold 64k tokens: SDPA's block mask alone would take 12 GiB
    off, line = padding_free_decision("auto", packing=False, batch_size=64, max_length=1024)
    assert not off and "train.packing: true" in line
    assert padding_free_decision(True, packing=False, batch_size=64, max_length=1024)[0] is True


def test_preflight_counts_the_flattened_row(tiny_plan, tmp_path):
    from launcher.preflight import step_shape

    (default,) = tiny_plan(tmp_path / "a", train={"per_device_train_batch_size": 4, "max_seq_length": 1024}).runs
    assert step_shape(default) == step_shape(default).__class__(4096, 4096, 1, True, flattened=True)
    (padded,) = tiny_plan(
        tmp_path / "b", train={"per_device_train_batch_size": 4, "max_seq_length": 1024, "padding_free": False}
    ).runs
    assert step_shape(padded).rows == 4 and not step_shape(padded).flattened
    (large,) = tiny_plan(tmp_path / "c", train={"per_device_train_batch_size": 64, "max_seq_length": 1024}).runs
    assert step_shape(large).rows == 64  # auto stays off: padded rows


def flat_and_padded(examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    return flat, padded


def test_labels_ignored_exactly_at_prompts_example_starts_and_padding():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # labels as trl's dataset preparation writes them for answer-only loss: -100 over the prompt
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
    ]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)(examples)
    assert "attention_mask" not in flat  # a mask would turn per-example attention off
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 0]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert flat["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, 11, -100]]
    # The tokens scored are those a padded batch scores after the shift: each example's own.
    _, padded = flat_and_padded(examples)
    scored_padded = sorted(t for row in padded["labels"][:, 1:].tolist() for t in row if t != -100)
    scored_flat = sorted(t for t in flat["labels"][0, 1:].tolist() if t != -100)
    assert scored_flat == scored_padded


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_flat_row_loss_and_logits_equal_the_padded_batch(tiny_model):
    import torch

    generator = torch.Generator().manual_seed(1)
    lengths = [7, 23, 4, 15]
    examples = [{"input_ids": torch.randint(3, 400, (n,), generator=generator).tolist()} for n in lengths]
    flat, padded = flat_and_padded(examples)
    with torch.no_grad():
        out_flat = tiny_model(
            input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"], use_cache=False
        )
        out_pad = tiny_model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            labels=padded["labels"],
            use_cache=False,
        )
        at = 0
        for row, n in enumerate(lengths):
            # every example's logits (hence its per-token and per-example loss) are its padded row's
            torch.testing.assert_close(out_flat.logits[0, at : at + n], out_pad.logits[row, :n], atol=1e-5, rtol=1e-4)
            at += n
        # a token never sees another example: changing example 0 leaves the others' logits alone
        changed = flat["input_ids"].clone()
        changed[0, : lengths[0]] = torch.randint(3, 400, (lengths[0],), generator=generator)
        out_changed = tiny_model(input_ids=changed, position_ids=flat["position_ids"], use_cache=False)
        torch.testing.assert_close(
            out_changed.logits[0, lengths[0] :], out_flat.logits[0, lengths[0] :], atol=1e-6, rtol=1e-5
        )
        assert (out_changed.logits[0, : lengths[0]] - out_flat.logits[0, : lengths[0]]).abs().max() > 1e-3
    # the batch loss (mean over scored tokens) is the padded batch's
    assert out_flat.loss.item() == pytest.approx(out_pad.loss.item(), rel=1e-5)


def train(tmp_path: Path, tiny_plan, padding_free) -> tuple[list[list[int]], list[float], str]:
    from launcher.job.progress import read_events
    from launcher.job.storage import RunPaths

    (run,) = tiny_plan(
        tmp_path,
        train={"max_steps": 4, "padding_free": padding_free, "group_by_length": True, "per_device_train_batch_size": 3},
    ).runs
    paths = RunPaths.of(run)
    env = {**os.environ, "QLAUNCH_RECORD_EXAMPLES": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "training.sft", str(paths.config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = [json.loads(line) for line in (paths.root / "examples-per-step.jsonl").read_text().splitlines()]
    steps = [line["examples"] for line in record if "step" in line]
    losses = [e["loss"] for e in read_events(paths.progress) if e.get("event") == "step"]
    return steps, losses, done.stdout


@pytest.mark.slow
def test_trainer_same_examples_and_loss_per_step_as_padded(tmp_path, tiny_plan):
    """Through the job's entrypoint: the default (auto) and `padding_free: false` train the same
    examples at every step with the same loss (answer-only, instruction data)."""
    flat_steps, flat_losses, flat_log = train(tmp_path / "flat", tiny_plan, "auto")
    pad_steps, pad_losses, pad_log = train(tmp_path / "padded", tiny_plan, False)
    assert "padding-free batches: on (auto)" in flat_log
    assert "padding-free batches: off (train.padding_free: false)" in pad_log
    assert flat_steps == pad_steps and len(flat_steps) == 4
    assert flat_losses == pytest.approx(pad_losses, rel=1e-4)
