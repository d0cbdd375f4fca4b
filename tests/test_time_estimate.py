"""The time estimate before submitting: per run and per grid, from the run's steps or its
dataset, on the target GPU type; checked against the committed H200 measurements."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from launcher import time_estimate
from launcher.grid import plan
from launcher.job.config import RunConfig

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "2026-12-02-h200-lean.json"
T4_FAST = {
    "fp16": True,
    "packing": True,
    "max_seq_length": 1024,
    "per_device_train_batch_size": 12,
    "group_by_length": False,
}


def experiment(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text("name: te\n" + textwrap.dedent(body))
    return path


def test_max_steps_runs_are_estimated_per_run_and_the_grid_sums_gpu_hours(tmp_path):
    runs = plan(
        experiment(
            tmp_path,
            """
        model: {name_or_path: NousResearch/Llama-2-7b-chat-hf}
        resources: {gpu_type: t4}
        train: {max_steps: 500, fp16: true, packing: true, max_seq_length: 1024}
        grid: {train.per_device_train_batch_size: [4, 12]}
        """,
        )
    ).runs
    small, large = time_estimate.estimate_grid(runs)
    assert small.steps == large.steps == 500
    assert large.tokens == pytest.approx(3 * small.tokens)
    # A bigger token budget per step amortises the per-step costs: less than 3x the time.
    assert small.seconds < large.seconds < 3 * small.seconds
    console = Console(record=True, width=200)
    console.print(time_estimate.format_table([small, large]))
    text = console.export_text()
    assert "grid" in text and f"{small.gpu_hours + large.gpu_hours:.2f}" in text


def test_epochs_of_a_local_dataset_count_its_tokens(tmp_path):
    rows = [{"text": "word " * 400} for _ in range(300)]  # ~500 tokens each at 4 characters a token
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = f"""
        model: {{name_or_path: NousResearch/Llama-2-7b-chat-hf}}
        dataset: {{path: data.jsonl, format: text}}
        resources: {{gpu_type: t4}}
        train: {json.dumps({**T4_FAST, "num_train_epochs": 2})}
        """
    (estimate,) = time_estimate.estimate_grid(plan(experiment(tmp_path, body)).runs)
    assert 2 * 300 * 500 * 0.95 < estimate.tokens < 2 * 300 * 505 * 1.05
    assert estimate.steps == pytest.approx(2 * 300 * 502 / (12 * 1024 * 0.995), abs=1)


def test_a_hub_dataset_without_max_steps_says_what_to_set(tmp_path):
    (estimate,) = time_estimate.estimate_grid(plan(experiment(tmp_path, "resources: {gpu_type: t4}\n")).runs)
    assert estimate.seconds is None and "train.max_steps" in estimate.note


def test_a_t4_is_estimated_an_order_of_magnitude_slower_than_an_h100(tmp_path):
    def seconds(gpu):
        run = RunConfig.model_validate(
            {
                "name": "te",
                "run_id": "0123456789",
                "run_dir": str(tmp_path),
                "model": {"name_or_path": "llama-2-7b"},
                "train": {**T4_FAST, "max_steps": 100},
                "resources": {"gpu_type": gpu},
            }
        )
        return time_estimate.estimate_time(run).seconds

    assert 10 < seconds("t4") / seconds("h100") < 25


def test_predicted_training_time_is_within_20_percent_of_the_measured_h200_runs(tmp_path):
    checked = []
    for r in json.loads(RESULTS.read_text())["results"]:
        size = "13b" if r["profile"].startswith("13b:") else "7b"
        run = RunConfig.model_validate(
            {
                "name": "bench",
                "run_id": "0123456789",
                "run_dir": str(tmp_path),
                "model": {"name_or_path": f"llama-2-{size}"},
                "train": {"padding_free": False, **r["train"]},
                "lora": {"target_modules": r["lora_target_modules"]},
                "resources": {"gpu_type": "h200"},
            }
        )
        if not r["train"]["packing"]:
            continue  # the notebook's padded tokens depend on its dataset (word-level here, not 4 chars a token)
        predicted = time_estimate.estimate_time(run).seconds
        error = predicted / r["train_runtime"] - 1
        checked.append(r["profile"])
        assert abs(error) <= 0.20, (r["profile"], f"{error:+.1%}")
    assert {"t4", "t4+liger", "t4-lean", "13b:t4", "13b:t4-lean"} <= set(checked)


def test_selective_checkpointing_is_estimated_faster_and_larger_than_full(tmp_path):
    """trl's selective checkpointing skips the attention recompute and keeps its output: preflight
    says so in both the time and the memory it estimates."""
    from launcher import preflight

    runs = plan(
        experiment(
            tmp_path,
            f"""
        model: {{name_or_path: NousResearch/Llama-2-7b-chat-hf}}
        resources: {{gpu_type: t4}}
        train: {json.dumps({**T4_FAST, "max_steps": 100})}
        grid: {{train.gradient_checkpointing: [true, selective]}}
        """,
        )
    ).runs
    full, selective = time_estimate.estimate_grid(runs)
    assert selective.seconds < full.seconds
    full_mem, selective_mem = (preflight.estimate_run(run).estimated_peak_bytes for run in runs)
    assert selective_mem > full_mem
