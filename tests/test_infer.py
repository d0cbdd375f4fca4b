"""The inference job: base + adapter from storage, side by side, scored on held-out examples."""

from __future__ import annotations

import json

import pytest
from training_support import events, run_job, tail

from launcher.job.errors import ConfigError
from launcher.job.metrics import get_metric, get_metrics
from launcher.job.storage import RunPaths

# --- metrics (fast) -------------------------------------------------------------------------------


def test_json_match_compares_values_not_layout():
    _, metric = get_metric("json_match")
    reference = '{"name": "Ana", "age": 30}'
    assert metric('{"age": 30, "name": "Ana"}', reference) == 1.0
    assert metric('```json\n{"name": "Ana", "age": 30}\n```', reference) == 0.0
    assert metric('{"name": "Ana", "age": 31}', reference) == 0.0


def test_format_match_checks_keys_and_types_only():
    _, metric = get_metric("format_match")
    reference = '{"name": "Ana", "age": 30, "city": "Oslo"}'
    assert metric('{"name": "Bo", "age": 7, "city": "Rome"}', reference) == 1.0
    assert metric('{"name": "Bo", "age": "7", "city": "Rome"}', reference) == 0.0
    assert metric('{"name": "Bo", "age": 7}', reference) == 0.0
    assert metric("Sure! Here it is: {}", reference) == 0.0


def test_exact_contains_and_regex():
    assert get_metric("exact_match")[1]("  OK \n", "OK") == 1.0
    assert get_metric("contains")[1]("The answer is Paris.", "paris") == 1.0
    assert get_metric(r"regex:\d+ apples")[1]("12 apples", "") == 1.0
    assert [name for name, _ in get_metrics("json_match, format_match")] == ["json_match", "format_match"]


def test_unknown_metric_names_the_key():
    with pytest.raises(ConfigError, match="inference.metric: unknown metric 'bleu'"):
        get_metrics("bleu")


# --- the inference job (slow) ---------------------------------------------------------------------

# The tiny random model learns one fixed answer: a clear, checkable difference from its base.
ANSWER = "OK"
ROWS = [{"instruction": f"Is {n} a number?", "response": ANSWER} for n in range(24)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_plan):
    folder = tmp_path_factory.mktemp("infer")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "eval.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Is {n} a number?", "reference": ANSWER}) + "\n" for n in (100, 200, 300))
    )
    run = tiny_plan(
        folder,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        train={
            "max_steps": 40,
            "learning_rate": 0.01,
            "per_device_train_batch_size": 4,
            "save_steps": 1000,
            "logging_steps": 10,
            "warmup_ratio": 0.0,
        },
        inference={
            "prompts": ["Is 7 a number?", "Hello there"],
            "eval_file": "eval.jsonl",
            "metric": "exact_match",
            "max_new_tokens": 4,
        },
    ).runs[0]
    log = folder / "train.log"
    assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=folder) == 0, tail(log)
    return run, folder


@pytest.mark.slow
def test_inference_writes_results_summary_and_an_event(trained):
    run, folder = trained
    paths = RunPaths.of(run)
    log = folder / "infer.log"
    assert run_job("training.infer", paths.root, "--merge", log=log, cwd=folder) == 0, tail(log)

    rows = [json.loads(line) for line in (paths.inference / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["prompt"]) for r in rows] == [
        ("prompt", "Is 7 a number?"),
        ("prompt", "Hello there"),
        ("eval", "Is 100 a number?"),
        ("eval", "Is 200 a number?"),
        ("eval", "Is 300 a number?"),
    ]
    assert all("base" in r and "tuned" in r for r in rows)
    assert all(r["tuned"] == ANSWER for r in rows if r["kind"] == "eval")
    summary = json.loads((paths.inference / "summary.json").read_text())
    assert summary["metric"] == {"name": "exact_match", "base": 0.0, "tuned": 1.0, "n": 3}
    assert summary["metrics"] == [summary["metric"]]
    assert summary["eval_examples"] == 3 and summary["prompts"] == 2
    output = log.read_text()
    assert "metric exact_match: base 0.00 → tuned 1.00 (3 held-out examples)" in output
    assert "base vs fine-tuned" in output  # the side-by-side table
    [done] = events(run, "infer_end")
    assert done["summary"] == summary
    assert paths.inference_completed()


@pytest.mark.slow
def test_merge_writes_a_plain_float16_model(trained):
    import torch
    from transformers import AutoModelForCausalLM

    run, folder = trained
    merged = RunPaths.of(run).root / "merged"
    if not merged.is_dir():
        assert (
            run_job("training.infer", RunPaths.of(run).root, "--merge", "--no-base", log=folder / "m.log", cwd=folder)
            == 0
        )
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.float16
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_command_line_prompts_are_answered_aside_and_no_base_skips_it(trained):
    run, folder = trained
    paths = RunPaths.of(run)
    before = {
        name: (paths.inference / name).read_bytes() if (paths.inference / name).exists() else None
        for name in ("results.jsonl", "summary.json")
    }
    log = folder / "cli.log"
    assert run_job("training.infer", paths.config, "--prompt", "Is 5 a number?", "--no-base", log=log, cwd=folder) == 0
    (adhoc,) = paths.inference.glob("adhoc-*.jsonl")
    rows = [json.loads(line) for line in adhoc.read_text().splitlines()]
    assert [(r["kind"], r["prompt"]) for r in rows] == [("prompt", "Is 5 a number?")]  # no held-out set
    assert all("base" not in r for r in rows)
    # The inference job's own results and metric stay as they were.
    after = {
        name: (paths.inference / name).read_bytes() if (paths.inference / name).exists() else None for name in before
    }
    assert after == before


@pytest.mark.slow
def test_an_untrained_run_is_a_clear_error(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path).runs[0]
    log = tmp_path / "infer.log"
    assert run_job("training.infer", RunPaths.of(run).config, log=log, cwd=tmp_path) == 2
    assert "has no trained adapter yet" in log.read_text()


def test_json_match_fenced_reads_json_out_of_a_fence_or_prose():
    _, metric = get_metric("json_match_fenced")
    reference = '{"name": "Ana", "age": 30}'
    assert metric('```json\n{"age": 30, "name": "Ana"}\n```', reference) == 1.0
    assert metric('Here you go: {"name": "Ana", "age": 30} — anything else?', reference) == 1.0
    assert metric('```\n{"name": "Ana", "age": 31}\n```', reference) == 0.0
    assert metric("no json here", reference) == 0.0
