"""The grid evaluation job (issue #29): one base model load for the grid, every adapter in
mixed batches, each run's files as the per-run inference job writes them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from training_support import events, run_job, tail

from launcher import evaluation
from launcher.job import grid_evaluation
from launcher.job.storage import RunPaths

# --- the launcher's side (fast) -------------------------------------------------------------------


def test_the_eval_set_fingerprint_follows_questions_and_settings_not_training(tmp_path, tiny_plan):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "Is 1 a number?", "reference": "OK"}) + "\n")
    run = tiny_plan(tmp_path / "a", inference={"eval_file": str(eval_file)}).runs[0]
    other_training = tiny_plan(
        tmp_path / "b", train={"learning_rate": 0.5}, inference={"eval_file": str(eval_file)}
    ).runs[0]
    longer = tiny_plan(tmp_path / "c", inference={"eval_file": str(eval_file), "max_new_tokens": 9}).runs[0]
    before = grid_evaluation.eval_set(run)
    assert before == grid_evaluation.eval_set(other_training)  # training is not the eval set
    assert before != grid_evaluation.eval_set(longer)
    eval_file.write_text(json.dumps({"prompt": "Is 1 a number?", "reference": "KO"}) + "\n")
    assert grid_evaluation.eval_set(run) != before  # a new reference


def test_grid_evaluation_is_the_default_on_every_backend(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path).runs[0]
    assert not any(evaluation.per_run(run, name) for name in ("local", "slurm", "kubernetes"))
    chosen = tiny_plan(tmp_path / "b", inference={"per_run": True}).runs[0]
    assert evaluation.per_run(chosen, "local")
    assert evaluation.to_evaluate([run]) == ([], {run.run_id: "not trained yet"})


def test_local_backend_plans_one_evaluation_job_unless_per_run(tmp_path, tiny_plan):
    from launcher.backends.local import LocalBackend

    grid = LocalBackend().prepare(tiny_plan(tmp_path / "grid", grid={"lora.r": [4, 8]}))
    assert list(grid.jobs.values()) == [["train", "evaluate"]] * 2
    assert "-m training.evaluate_grid" in grid.files["evaluate.sh"]
    assert not any("training.infer" in text for text in grid.files.values())
    per_run = LocalBackend().prepare(
        tiny_plan(tmp_path / "per-run", inference={"per_run": True}, grid={"lora.r": [4, 8]})
    )
    assert list(per_run.jobs.values()) == [["train", "infer"]] * 2
    assert "evaluate.sh" not in per_run.files
    assert all("-m training.infer" in text for text in per_run.files.values())


def test_adapter_by_adapter_when_peft_cannot_mix_adapters_in_a_batch():
    import contextlib

    import torch

    from training.evaluate_grid import BASE, generate_rows

    class Tokenizer:
        pad_token_id = eos_token_id = 0

        def __call__(self, texts, **_):
            return _Batch({"input_ids": torch.ones(len(texts), 2, dtype=torch.long)})

        def batch_decode(self, tokens, **_):
            return [f"answer {int(row[0])}" for row in tokens]

    class _Batch(dict):
        def to(self, device):
            return self

    class Model:
        active = "none"

        def parameters(self):
            return iter([torch.zeros(1)])

        def generate(self, input_ids, adapter_names=None, **_):
            if adapter_names is not None:
                raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
            return torch.cat([input_ids, torch.full((len(input_ids), 1), len(self.active))], dim=1)

        def set_adapter(self, name):
            self.active = name

        @contextlib.contextmanager
        def disable_adapter(self):
            self.active, before = "", self.active
            yield
            self.active = before

    rows = [("q1", BASE), ("q1", "run_a"), ("q1", "run_bb"), ("q2", BASE), ("q2", "run_a"), ("q2", "run_bb")]
    answers = generate_rows(Model(), Tokenizer(), rows, (4, 0.0), per_batch=6)
    assert answers == ["answer 0", "answer 5", "answer 6"] * 2  # base, then each adapter, row by row


def test_inference_batch_size_sets_the_answers_per_generate_call(tmp_path, tiny_plan):
    import torch

    from training.evaluate_grid import BASE, answers_per_call, generate_rows

    class Tokenizer:
        pad_token_id = eos_token_id = 0

        def __call__(self, texts, **_):
            return _Batch({"input_ids": torch.ones(len(texts), 2, dtype=torch.long)})

        def batch_decode(self, tokens, **_):
            return ["answer"] * len(tokens)

    class _Batch(dict):
        def to(self, device):
            return self

    class Model:
        config = None
        calls: list[int] = []

        def parameters(self):
            return iter([torch.zeros(1)])

        def generate(self, input_ids, adapter_names=None, **_):
            self.calls.append(len(input_ids))
            return torch.cat([input_ids, torch.zeros(len(input_ids), 1, dtype=torch.long)], dim=1)

    rows = [(f"q{i}", who) for i in range(10) for who in (BASE, "run_a")]  # 20 answers
    fixed = tiny_plan(tmp_path / "fixed", inference={"batch_size": 6}).runs
    model = Model()
    generate_rows(model, Tokenizer(), rows, (4, 0.0), answers_per_call(fixed, model, 2, 8, 4))
    assert model.calls == [6, 6, 6, 2]
    auto = tiny_plan(tmp_path / "auto").runs  # auto: today's choice (whole prompts, up to 192 rows)
    assert auto[0].inference.batch_size == "auto"
    if not torch.cuda.is_available():  # on a GPU, auto also caps by its free memory
        assert answers_per_call(auto, model, 2, 8, 4) == 192


# --- the job (slow) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_plan):
    """Three runs of the tiny model: two trained, one never trained."""
    folder = tmp_path_factory.mktemp("evalgrid")
    (folder / "eval.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"What comes after {n}?", "reference": f"{n + 1} comes after {n}."}) + "\n"
            for n in (30, 40, 50)
        )
    )
    p = tiny_plan(
        folder,
        inference={
            "prompts": ["What comes after 3?", "Say hello"],
            "eval_file": "eval.jsonl",
            "metric": "exact_match,contains",
            "max_new_tokens": 6,
        },
        grid={"train.learning_rate": [0.01, 0.02, 0.005]},
    )
    trained = p.runs[:2]
    for run in trained:
        log = folder / f"{run.run_id}.train.log"
        assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=folder) == 0, tail(log)
    return p, folder


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (RunPaths.of(run).inference / "results.jsonl").read_text().splitlines()]


def _evaluate(folder, runs, *extra, name="runs.txt"):
    listing = evaluation.write_runs_file(runs, folder / name.replace(".txt", ""))
    log = folder / f"{name}.log"
    code = run_job("training.evaluate_grid", str(listing), *extra, log=log, cwd=folder)
    return code, log.read_text()


@pytest.mark.slow
def test_one_base_load_evaluates_every_trained_run_like_per_run_inference(grid):
    p, folder = grid
    first, second, untrained = p.runs
    log = folder / "per-run.log"
    assert run_job("training.infer", RunPaths.of(first).config, log=log, cwd=folder) == 0, tail(log)
    per_run_rows = _rows(first)
    per_run_summary = json.loads((RunPaths.of(first).inference / "summary.json").read_text())
    shutil.rmtree(RunPaths.of(first).inference)

    code, output = _evaluate(folder, p.runs)
    assert code == 0, output[-4000:]
    assert output.count("loading base model") == 1
    assert output.count("self-check: with adapters disabled the model is the base model") == 1
    # The same greedy answers as the run's own inference job.
    assert _rows(first) == per_run_rows
    for run in (first, second):
        summary = json.loads((RunPaths.of(run).inference / "summary.json").read_text())
        assert summary["eval_set"] == grid_evaluation.eval_set(run)
        assert summary["evaluated_by"]["runs"] == 2 and summary["evaluated_by"]["base_loads"] == 1
        assert [m["name"] for m in summary["metrics"]] == ["exact_match", "contains"]
        assert events(run, "infer_end")[-1]["summary"] == summary
        assert f"run {run.run_id} metric exact_match: base" in output
    summary = json.loads((RunPaths.of(first).inference / "summary.json").read_text())
    assert summary["metrics"] == per_run_summary["metrics"]
    assert _rows(second) != _rows(first)  # its own adapter answered, not the first one's
    assert [r["base"] for r in _rows(second)] == [r["base"] for r in _rows(first)]  # the base answered once
    assert not RunPaths.of(untrained).inference_completed()
    outcomes = evaluation.outcomes(p.runs)
    assert outcomes[first.run_id] == outcomes[second.run_id] == {"outcome": "evaluated"}
    assert outcomes[untrained.run_id] == {"outcome": "not evaluated", "why": "not trained (no adapter)"}
    assert f"not evaluated: {untrained.run_id}: not trained (no adapter)" in output


@pytest.mark.slow
def test_scored_runs_are_skipped_and_a_corrupt_adapter_is_named_not_fatal(grid):
    p, folder = grid
    first, second, _ = p.runs
    if not RunPaths.of(second).inference_completed():
        assert _evaluate(folder, p.runs[:2])[0] == 0
    code, output = _evaluate(folder, p.runs[:2], name="again.txt")
    assert code == 0 and "loading base model" not in output
    assert "2 already scored" in output

    weights = RunPaths.of(second).adapter / "adapter_model.safetensors"
    saved = weights.read_bytes()
    try:
        weights.write_bytes(b"\0" * 64)
        code, output = _evaluate(folder, p.runs[:2], "--force", name="corrupt.txt")
        assert code == 0, output[-4000:]
        assert f"not evaluated: {second.run_id}: adapter weights" in output
        assert evaluation.outcomes(p.runs)[first.run_id] == {"outcome": "evaluated"}
        # Nothing it could evaluate: the job fails.
        code, output = _evaluate(folder, [second], "--force", name="only-corrupt.txt")
        assert code == 1 and "0 evaluated" in output
    finally:
        weights.write_bytes(saved)


@pytest.mark.slow
def test_qlaunch_evaluate_evaluates_only_what_is_trained_and_not_yet_scored(grid, tmp_path):
    p, folder = grid
    first, second, untrained = p.runs
    if not RunPaths.of(first).inference_completed():
        assert _evaluate(folder, [first])[0] == 0
    shutil.rmtree(RunPaths.of(second).inference, ignore_errors=True)  # its results lost: evaluated again
    env = {**os.environ, "QLAUNCH_HOME": str(tmp_path), "COLUMNS": "200"}
    command = [sys.executable, "-m", "launcher.cli", "evaluate", str(p.source)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = " ".join(done.stdout.split())
    assert f"{first.run_id} skipped: already scored on this eval set" in printed
    assert f"{untrained.run_id} skipped: not trained yet" in printed
    assert f"1 runs to evaluate in one job: {second.run_id}" in printed
    assert re.search(rf"{second.run_id}: exact_match base \d\.\d\d → tuned \d\.\d\d on 3 held-out prompts", printed)
    assert grid_evaluation.already_scored(second)
    again = subprocess.run(
        [*command, "--runs", second.run_id[:6]], capture_output=True, text=True, env=env, timeout=120
    )
    assert again.returncode == 0 and "nothing to evaluate" in again.stdout
