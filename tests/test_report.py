"""`qlaunch report` on a tiny real grid: one run preempted by a real SIGTERM, one killed with
SIGKILL after a checkpoint, both resumed by `qlaunch run`; the report's numbers must say what
happened (restarts, steps redone, where each attempt resumed) and match the runs' own files."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import pytest
from training_support import events, start_job, tail, wait_until

from launcher.grid import plan
from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths, read_json
from launcher.json_output import PlanDocument, ReportDocument, StatusDocument

pytestmark = pytest.mark.slow

STEPS = 12
SAVE_EVERY = 4


def qlaunch(*args, home, columns=None):
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    env.update(QLAUNCH_HOME=str(home), OMP_NUM_THREADS="1")
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, timeout=900
    )


def last_step(run) -> int:
    steps = events(run, "step")
    return steps[-1]["step"] if steps else 0


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_experiment):
    """The grid after: run A SIGTERMed at step ≥ 3, run B SIGKILLed after checkpoint-4, then
    `qlaunch run` (resumes both, then inference). Returns (experiment path, plan, home, facts)."""
    folder = tmp_path_factory.mktemp("report")
    evals = "".join(
        json.dumps({"prompt": f"What comes after {n}?", "reference": f"{n + 1} comes after {n}."}) + "\n"
        for n in (3, 7, 11)
    )
    (folder / "eval.jsonl").write_text(evals)
    path = tiny_experiment(
        folder,
        dataset={"path": "data.jsonl", "test_size": 4},
        train={"max_steps": STEPS, "save_steps": SAVE_EVERY, "logging_steps": 1},
        inference={"prompts": ["What comes after 3?"], "eval_file": "eval.jsonl", "max_new_tokens": 8},
        grid={"train.learning_rate": [1e-3, 2e-3]},
    )
    p = plan(path)
    home = folder / "home"
    assert qlaunch("plan", str(path), home=home).returncode == 0
    from launcher.job.storage import write_run_config

    preempted, killed = p.runs
    for run in p.runs:
        write_run_config(run)

    # A: a real SIGTERM mid-training → checkpoint at the current step, exit 75.
    log = folder / "a.log"
    job = start_job("training.sft", RunPaths.of(preempted).config, log=log, cwd=folder)
    wait_until(lambda: last_step(preempted) >= 3 or job.poll() is not None, 300, "step 3")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    stopped_at = events(preempted, "preempted")[0]["step"]

    # B: SIGKILL after checkpoint-4 was published: no save, the steps after 4 are trained again.
    log = folder / "b.log"
    job = start_job("training.sft", RunPaths.of(killed).config, log=log, cwd=folder)
    wait_until(lambda: last_step(killed) >= SAVE_EVERY + 2 or job.poll() is not None, 300, "step 6")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    killed_at = last_step(killed)
    assert (RunPaths.of(killed).checkpoints / f"checkpoint-{SAVE_EVERY}").is_dir()

    result = qlaunch("run", str(path), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    return path, p, home, {"stopped_at": stopped_at, "killed_at": killed_at}


def test_report_files_hold_what_happened(grid, tmp_path):
    path, p, home, facts = grid
    out = tmp_path / "out"
    result = qlaunch("report", str(path), "-o", str(out), "--json", home=home)
    assert result.returncode == 0, result.stderr
    document = ReportDocument.model_validate_json(result.stdout)  # one JSON document, of the documented shape
    assert json.loads((out / "report.json").read_text()) == json.loads(result.stdout)
    preempted, killed = p.runs
    runs = {run.run_id: run for run in document.runs}

    a = runs[preempted.run_id]
    assert [x.outcome for x in a.attempts] == ["preempted", "completed"]
    assert a.attempts[0].signal == "SIGTERM" and a.attempts[0].stop_step == facts["stopped_at"]
    assert a.attempts[1].resumed_from == facts["stopped_at"]
    assert (a.restarts, a.steps_redone) == (1, 0)  # the signal saved the step it stopped at
    assert a.lost_seconds > 0  # the second attempt still had to load the model

    b = runs[killed.run_id]
    assert [x.outcome for x in b.attempts] == ["killed", "completed"]
    assert b.attempts[1].resumed_from == SAVE_EVERY
    assert (b.restarts, b.steps_redone) == (1, facts["killed_at"] - SAVE_EVERY)
    assert [e["step"] for e in events(killed, "killed")] == [facts["killed_at"]]  # recorded by attempt 2

    for run in p.runs:
        row, paths = runs[run.run_id], RunPaths.of(run)
        steps = [e for e in events(run, "step")]
        assert row.state == "completed" and row.step == STEPS
        assert row.final_loss == steps[-1]["loss"]
        assert row.best_loss == min(loss for _, loss in row.loss_curve)
        assert [s for s, _ in row.loss_curve] == list(range(1, STEPS + 1))  # redone steps counted once
        assert row.eval_loss == read_json(paths.metrics)["eval_loss"]
        summary = read_json(paths.inference / "summary.json")
        assert row.metric.model_dump() == summary["metric"]
        assert row.gpus == 0 and row.gpu_hours == 0  # a CPU grid
        assert row.answers and row.answers[0].prompt == "What comes after 3?"
    ranked = sorted(document.runs, key=lambda r: (-r.metric.tuned, r.final_loss))
    assert [r.run_id for r in document.runs] == [r.run_id for r in ranked]
    assert document.best_run == document.runs[0].run_id and document.runs[0].best

    markdown = (out / "report.md").read_text()
    top = "1 (within noise)" if document.comparison and document.comparison.within_noise else "★ best"
    for run in document.runs:  # 3 held-out examples cannot tell two runs apart: no crown then
        assert f"| {top if run.best else run.rank} | {run.run_id} |" in markdown
    html = (out / "report.html").read_text()
    for image in ("loss.png", "metric.png"):
        png = (out / image).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in html  # inlined: the HTML alone is the report
    assert "killed without a save" in html and "preempted (SIGTERM)" in html


def test_status_and_plan_json_and_whole_tables(grid):
    path, p, home, _ = grid
    result = qlaunch("status", str(path), "--json", home=home)
    assert result.returncode == 0, result.stderr
    status = StatusDocument.model_validate_json(result.stdout)
    configs = {run.run_id: run for run in p.runs}
    for run in status.runs:
        summary = read_json(RunPaths.of(configs[run.run_id]).inference / "summary.json")
        assert (run.state, run.infer_state, run.step, run.restarts) == ("completed", "completed", STEPS, 1)
        assert run.metric.model_dump() == summary["metric"]
    planned = PlanDocument.model_validate_json(qlaunch("plan", str(path), "--json", home=home).stdout)
    assert [r.run_id for r in planned.runs] == [r.run_id for r in p.runs]

    piped = qlaunch("status", str(path), home=home).stdout  # stdout is a pipe, no $COLUMNS
    assert "…" not in piped and piped.count("completed") == 4
    metric = read_json(RunPaths.of(p.runs[0]).inference / "summary.json")["metric"]
    assert f"{metric['base']:.2f} → {metric['tuned']:.2f}" in piped  # the headline metric, base → tuned
    narrow = qlaunch("status", str(path), home=home, columns=44).stdout
    for run in p.runs:
        assert run.run_id in narrow
    assert narrow.count("completed") >= 2 and "…" not in narrow
