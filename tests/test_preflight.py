"""The pre-flight memory check: notebook recipes pass on a T4, runs that cannot fit are refused
with the knob to turn, and the knob it names really makes the run fit."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from launcher import preflight
from launcher.grid import plan
from launcher.preflight import GiB

ROOT = Path(__file__).resolve().parents[1]


def write_experiment(tmp_path: Path, body: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text("name: pf\n" + textwrap.dedent(body))
    return path


def estimates_for(tmp_path: Path, body: str) -> list[preflight.RunEstimate]:
    return preflight.preflight(plan(write_experiment(tmp_path, body)))


def test_notebook_recipe_fits_a_t4(tmp_path):
    (estimate,) = estimates_for(tmp_path, "resources: {gpu_type: t4}\n")
    assert estimate.checked and estimate.fits
    assert estimate.advice == ""
    assert 4 * GiB < estimate.estimated_peak_bytes < estimate.capacity_bytes
    assert estimate.capacity_bytes < 15 * GiB  # the CUDA context is not PyTorch's to use
    assert estimate.breakdown["weights"] > 3.5 * GiB  # 6.7e9 weights at 4.5 bits, fp16 embeddings


def test_huge_batch_without_checkpointing_is_refused_with_the_knob(tmp_path):
    (estimate,) = estimates_for(
        tmp_path,
        """
        resources: {gpu_type: t4}
        train: {per_device_train_batch_size: 64, max_seq_length: 4096, gradient_checkpointing: false}
        """,
    )
    assert not estimate.fits
    assert estimate.estimated_peak_bytes > estimate.capacity_bytes
    assert "train." in estimate.advice and "GiB" in estimate.advice


def test_the_advised_batch_size_fits(tmp_path):
    # The lean levers already on: what is left to turn is the batch.
    body = """
        resources: {gpu_type: t4}
        train: {per_device_train_batch_size: 48, max_seq_length: 2048, use_liger_kernel: true,
                activation_offloading: sync, expandable_segments: true}
        """
    (refused,) = estimates_for(tmp_path, body)
    assert not refused.fits
    assert "per_device_train_batch_size to " in refused.advice
    smaller = int(refused.advice.split("per_device_train_batch_size to ")[1].split()[0])
    assert 1 <= smaller < 48
    (advised,) = estimates_for(tmp_path, body.replace("48,", f"{smaller},"))
    assert advised.fits


def test_grid_points_are_judged_one_by_one(tmp_path):
    estimates = estimates_for(
        tmp_path,
        """
        resources: {gpu_type: t4}
        train: {max_seq_length: 2048}
        grid: {train.per_device_train_batch_size: [1, 32]}
        """,
    )
    assert [e.fits for e in estimates] == [True, False]
    assert estimates[0].estimated_peak_bytes < estimates[1].estimated_peak_bytes


def test_the_same_run_fits_a_larger_gpu(tmp_path):
    body = """
        train: {per_device_train_batch_size: 16, max_seq_length: 2048}
        resources: {gpu_type: GPU}
        """
    (t4,) = estimates_for(tmp_path, body.replace("GPU", "t4"))
    (a100,) = estimates_for(tmp_path, body.replace("GPU", "a100-80gb"))
    assert not t4.fits and a100.fits
    assert t4.estimated_peak_bytes == a100.estimated_peak_bytes


def test_model_too_large_for_the_gpu_says_pick_another_gpu(tmp_path):
    (estimate,) = estimates_for(
        tmp_path,
        """
        model: {name_or_path: meta-llama/Llama-2-70b-hf}
        resources: {gpu_type: t4}
        """,
    )
    assert not estimate.fits
    assert "resources.gpu_type" in estimate.advice


def test_bf16_on_a_t4_is_refused(tmp_path):
    (estimate,) = estimates_for(tmp_path, "resources: {gpu_type: t4}\ntrain: {bf16: true}\n")
    assert not estimate.fits
    assert "train.fp16" in estimate.advice
    (ok,) = estimates_for(tmp_path, "resources: {gpu_type: l4}\ntrain: {bf16: true}\n")
    assert ok.fits


def test_local_model_folder_shape_is_read_from_config_json(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 1000,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
            }
        )
    )
    (estimate,) = estimates_for(tmp_path, "model: {name_or_path: ./tiny-model}\nresources: {gpu_type: t4}\n")
    assert estimate.checked and estimate.fits
    assert estimate.breakdown["weights"] < 1024**2  # thousands of parameters, not billions


def test_unknown_model_or_gpu_is_not_refused(tmp_path):
    (model,) = estimates_for(tmp_path, "model: {name_or_path: someone/mystery-model}\nresources: {gpu_type: t4}\n")
    assert model.fits and not model.checked
    assert "not checked" in model.advice
    (gpu,) = estimates_for(tmp_path, "resources: {gpu_type: quantum-9000}\n")
    assert gpu.fits and not gpu.checked
    assert "resources.gpu_type" in gpu.advice


@pytest.mark.parametrize("gpu_type", ["t4", "nvidia-tesla-t4", "T4", "a100_80gb", "nvidia-h100"])
def test_gpu_type_spellings(gpu_type):
    assert preflight.gpu_capacity(gpu_type) is not None


def test_shipped_t4_profile_fits_a_t4():
    examples = Path(__file__).resolve().parents[1] / "examples" / "profiles"
    profile = examples / "t4-fast.yaml"
    if not profile.exists():
        pytest.skip("examples/profiles/t4-fast.yaml not written yet")
    for estimate in preflight.preflight(plan(profile)):
        assert estimate.fits, estimate.advice
        assert estimate.estimated_peak_bytes <= 14 * GiB


def test_table_shows_the_verdict_and_advice(tmp_path):
    estimates = estimates_for(
        tmp_path,
        """
        resources: {gpu_type: t4}
        grid: {train.per_device_train_batch_size: [4, 48]}
        """,
    )
    console = Console(record=True, width=250)
    console.print(preflight.format_table(estimates))
    text = console.export_text()
    for estimate in estimates:
        assert estimate.run_id in text
    assert "yes" in text and "no" in text
    assert "activation_offloading" in text  # the lean levers make the batch of 48 fit


def test_a_run_that_does_not_fit_is_told_the_lean_lever_that_makes_it_fit(tmp_path):
    body = """
        model: {name_or_path: meta-llama/Llama-2-13b-hf}
        resources: {gpu_type: t4}
        train: {fp16: true, packing: true, max_seq_length: 1024, per_device_train_batch_size: 12,
                group_by_length: false}
        """
    (refused,) = estimates_for(tmp_path, body)
    assert not refused.fits and refused.estimated_peak_bytes > 16 * GiB
    assert "with train.activation_offloading: true" in refused.advice and "same math" in refused.advice
    (advised,) = estimates_for(
        tmp_path, body.replace("group_by_length: false", "group_by_length: false, activation_offloading: true")
    )
    assert advised.fits
    assert advised.estimated_peak_bytes < refused.estimated_peak_bytes - 3 * GiB


def test_shipped_lean_profile_fits_13b_on_a_t4(tmp_path):
    profile = Path(__file__).resolve().parents[1] / "examples" / "profiles" / "t4-lean.yaml"
    text = profile.read_text().replace("NousResearch/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-hf")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("name:"))
    (estimate,) = preflight.preflight(plan(write_experiment(tmp_path, body)))
    assert estimate.fits and estimate.estimated_peak_bytes <= 14 * GiB


RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "2026-12-02-h200-lean.json"


def measured_runs(tmp_path):
    """(profile, RunConfig as the bench ran it, measured peak reserved) from the committed H200 run."""
    from launcher.job.config import RunConfig

    for r in json.loads(RESULTS.read_text())["results"]:
        size = "13b" if r["profile"].startswith("13b:") else "7b"
        run = RunConfig.model_validate(
            {
                "name": "bench",
                "run_id": "0123456789",
                "run_dir": str(tmp_path),
                "model": {"name_or_path": f"meta-llama/Llama-2-{size}-hf"},
                "train": {"padding_free": False, **r["train"]},
                "lora": {"target_modules": r["lora_target_modules"]},
                "resources": {"gpu_type": "t4"},
            }
        )
        yield r, run


def test_estimates_match_the_measured_peaks_of_every_lever_within_10_percent(tmp_path):
    checked = []
    for r, run in measured_runs(tmp_path):
        estimate = preflight.estimate_run(run).estimated_peak_bytes
        error = estimate / r["peak_reserved_bytes"] - 1
        checked.append(r["profile"])
        assert abs(error) <= 0.10, (r["profile"], f"{error:+.1%}")
    assert {"t4-lean", "13b:t4-lean", "t4+offload", "t4+liger", "t4+expandable"} <= set(checked)


def test_runs_without_packing_are_told_its_measured_effect_and_packed_runs_are_not(tmp_path):
    from launcher import speed_tips

    notebook, fast = plan(
        write_experiment(
            tmp_path,
            """
        resources: {gpu_type: t4}
        grid: {train.packing: [false, true]}
        """,
        )
    ).runs
    (packing_tip,) = [t for t in speed_tips.tips(notebook) if t.startswith("train.packing: true")]
    assert "3.2× tokens/s" in packing_tip and "GiB here" in packing_tip
    fast_tips = speed_tips.tips(fast)
    assert not any(t.startswith("train.packing") for t in fast_tips)
    # Packed at trl's 4×1024: the profile's 12×1024 budget is offered, since it fits a T4.
    assert any(t.startswith("token budget: per_device_train_batch_size: 12") for t in fast_tips)


def test_preflight_prints_tips_and_the_time_estimate(tmp_path, capsys):
    from launcher.cli import main

    path = write_experiment(tmp_path, "resources: {gpu_type: t4}\ntrain: {max_steps: 100, use_liger_kernel: false}\n")
    assert main(["preflight", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "faster:" in out and "train.packing: true" in out and "use_liger_kernel: auto" in out
    assert "time estimate" in out and "GPU-h" in out


# Issue #31's lease (one H100, 2026-12-07, bench/train_throughput.py, 40 steps, liger-kernel installed):
# profile → (recipe sections, peak reserved GiB, tokens/s at 12,234 real tokens per step).
ISSUE_31_H100 = {
    "t4-fast": ({}, 10.28, 12001),
    "t4-lean": ({"lean": True}, 6.59, 10942),
    "t4-fast+all-linear": ({"lora": {"target_modules": "all-linear"}}, 11.83, 8805),
    "t4-lean+all-linear": ({"lean": True, "lora": {"target_modules": "all-linear"}}, 8.43, 8059),
    "13b:t4-lean": ({"lean": True, "size": "13b"}, 10.88, 6250),
}


@pytest.mark.parametrize("name", sorted(ISSUE_31_H100))
def test_every_profile_is_estimated_within_5_percent_memory_and_10_percent_time(tmp_path, name):
    """Liger `auto` counted, all-linear LoRA, lean + all-linear, 13B: the shipped profiles as the
    measured runs used them (memory for a T4, whose peak is the same bytes; time for the H100)."""
    from launcher import time_estimate
    from launcher.job.config import RunConfig
    from launcher.job.experiment_file import load_yaml

    changes, measured_gib, tokens_per_second = ISSUE_31_H100[name]
    profile = ROOT / "examples" / "profiles" / ("t4-lean.yaml" if changes.get("lean") else "t4-fast.yaml")
    data = load_yaml(profile.read_text())
    run = RunConfig.model_validate(
        {
            "name": "bench",
            "run_id": "0123456789",
            "run_dir": str(tmp_path),
            "model": {"name_or_path": f"meta-llama/Llama-2-{changes.get('size', '7b')}-hf"},
            "quantization": data["quantization"],
            "lora": {**data["lora"], **changes.get("lora", {})},
            "train": {**data["train"], "max_steps": 40},
            "resources": {"gpu_type": "t4"},
        }
    )
    estimate = preflight.estimate_run(run).estimated_peak_bytes / GiB
    assert abs(estimate / measured_gib - 1) <= 0.05, (name, estimate, measured_gib)
    h100 = run.model_copy(update={"resources": run.resources.model_copy(update={"gpu_type": "h100"})})
    seconds_per_step = time_estimate.estimate_time(h100).seconds_per_step
    assert abs(seconds_per_step / (12234 / tokens_per_second) - 1) <= 0.10, (name, seconds_per_step)


def test_the_grid_evaluation_job_is_estimated_and_a_batch_that_cannot_fit_is_refused_with_the_knob(tmp_path):
    from launcher.runner import preflight_refusals

    grid = "resources: {gpu_type: t4}\ngrid: {lora.r: [16, 64, 128]}\n"
    estimates, refused = preflight_refusals(plan(write_experiment(tmp_path, grid)))
    evaluation = estimates[-1]
    assert evaluation.run_id == "evaluation (3 runs)" and len(estimates) == 4 and refused == []
    # One 4-bit base, three fp32 adapters beside it, one batch of answers.
    assert evaluation.checked and evaluation.fits and 3.5 * GiB < evaluation.breakdown["weights"] < 4.5 * GiB
    assert evaluation.breakdown["lora"] > 0 and evaluation.estimated_peak_bytes < evaluation.capacity_bytes

    big = write_experiment(tmp_path, grid + "inference: {batch_size: 64}\n", name="big.yaml")
    _, refused = preflight_refusals(plan(big))
    (too_big,) = refused
    assert too_big.run_id == "evaluation (3 runs)" and "set inference.batch_size: " in too_big.advice
    room = int(too_big.advice.rsplit("inference.batch_size: ", 1)[1].split()[0])
    fixed = write_experiment(tmp_path, grid + f"inference: {{batch_size: {room}}}\n", name="fixed.yaml")
    assert preflight_refusals(plan(fixed))[1] == []  # the advice fits
    per_run = write_experiment(tmp_path, grid + "inference: {batch_size: 64, per_run: true}\n", name="per-run.yaml")
    assert all(e.run_id != "evaluation (3 runs)" for e in preflight_refusals(plan(per_run))[0])
