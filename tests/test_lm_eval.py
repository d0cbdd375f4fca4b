"""Standard benchmarks in the grid evaluation (issue #29): `inference.lm_eval` runs
lm-evaluation-harness for the base model and every adapter on the one loaded base; the task names
are checked at plan time from the task YAML files (no torch in the launcher)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from training_support import run_job, tail

from launcher import evaluation
from launcher.grid import plan
from launcher.input_checks import check_plan
from launcher.job import grid_evaluation
from launcher.job.errors import ConfigError
from launcher.job.storage import RunPaths

EXAMPLE_TASKS = Path(__file__).resolve().parent.parent / "examples" / "lm_eval"
LOCAL = {"tasks": ["qlaunch_numbers"], "include_path": str(EXAMPLE_TASKS)}


def _plan_error(tiny_experiment, folder, **lm_eval) -> str:
    path = tiny_experiment(folder, inference={"lm_eval": lm_eval})
    with pytest.raises(ConfigError) as caught:
        plan(path)
    return str(caught.value)


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --- plan time (fast) -----------------------------------------------------------------------------


def test_an_unknown_task_is_one_located_error_with_close_names(tmp_path, tiny_experiment):
    message = _plan_error(tiny_experiment, tmp_path, tasks=["arc_easy", "arc_eazy"])
    path = tmp_path / "tiny.yaml"
    assert message.count("\n") == 0, message
    assert message.startswith(f"{path}:{_line_of(path, 'tasks:')}: inference.lm_eval.tasks: ")
    assert "'arc_eazy'" in message and "close names: 'arc_easy'" in message
    assert "'arc_easy' (" not in message  # the known name is not listed as unknown


def test_a_local_task_from_include_path_plans_and_its_typo_names_it(tmp_path, tiny_experiment):
    assert plan(tiny_experiment(tmp_path / "ok", inference={"lm_eval": LOCAL})).runs
    message = _plan_error(tiny_experiment, tmp_path / "typo", tasks=["qlaunch_number"], include_path=str(EXAMPLE_TASKS))
    assert "inference.lm_eval.tasks" in message and "close names: 'qlaunch_numbers'" in message
    missing = _plan_error(tiny_experiment, tmp_path / "nofolder", tasks=["qlaunch_numbers"], include_path="nowhere")
    assert "inference.lm_eval.include_path: no folder" in missing and "nowhere" in missing


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"tasks": ["arc_easy"], "limit": 0}, "inference.lm_eval.limit: must be a whole number"),
        ({"tasks": ["arc_easy"], "limit": 1.5}, "inference.lm_eval.limit: must be a whole number"),
        ({"tasks": ["arc_easy"], "num_fewshot": -1}, "inference.lm_eval.num_fewshot: Input should be greater than"),
        ({"tasks": []}, "inference.lm_eval.tasks: List should have at least 1 item"),
        ({"tasks": ["arc_easy"], "limt": 5}, "inference.lm_eval.limt: unknown key"),
    ],
)
def test_bad_lm_eval_values_name_file_line_and_key(tmp_path, tiny_experiment, settings, expected):
    message = _plan_error(tiny_experiment, tmp_path, **settings)
    assert f"{tmp_path / 'tiny.yaml'}:" in message and expected in message, message


def test_a_hub_task_is_refused_before_submitting_to_a_cluster_unless_allowed(tmp_path, tiny_experiment):
    hub = tiny_experiment(tmp_path / "hub", backend="slurm", inference={"lm_eval": {"tasks": ["arc_easy"]}})
    problems = [str(p) for p in check_plan(plan(hub)) if p.level == "error"]
    assert any(
        ": inference.lm_eval.tasks: reads its dataset from the hub: arc_easy (allenai/ai2_arc)" in p for p in problems
    ), problems
    allowed = tiny_experiment(
        tmp_path / "allowed", backend="slurm", inference={"lm_eval": {"tasks": ["arc_easy"], "allow_hub": True}}
    )
    assert not [p for p in check_plan(plan(allowed)) if "lm_eval" in p.key]
    local_backend = tiny_experiment(tmp_path / "local", inference={"lm_eval": {"tasks": ["arc_easy"]}})
    assert not [p for p in check_plan(plan(local_backend)) if "lm_eval" in p.key]  # this machine downloads
    shipped = tiny_experiment(tmp_path / "shipped", backend="slurm", inference={"lm_eval": LOCAL})
    assert not [p for p in check_plan(plan(shipped)) if "lm_eval" in p.key]  # a local task needs no hub


def test_a_local_task_whose_data_file_is_missing_is_refused_before_anything_starts(tmp_path, tiny_experiment):
    tasks = tmp_path / "tasks"
    shutil.copytree(EXAMPLE_TASKS, tasks)
    (tasks / "qlaunch_numbers.jsonl").unlink()
    path = tiny_experiment(tmp_path, inference={"lm_eval": {"tasks": ["qlaunch_numbers"], "include_path": "tasks"}})
    problems = [str(p) for p in check_plan(plan(path))]
    assert any("data file" in p and "qlaunch_numbers.jsonl does not exist" in p for p in problems), problems


def test_lm_eval_needs_the_grid_evaluation_job(tmp_path, tiny_experiment):
    path = tiny_experiment(tmp_path, inference={"per_run": True, "lm_eval": LOCAL})
    with pytest.raises(ConfigError, match="inference.lm_eval: lm-eval tasks run in the grid evaluation job"):
        plan(path)


def test_the_eval_set_follows_lm_eval_settings_and_leaves_other_runs_alone(tmp_path, tiny_plan):
    plain = tiny_plan(tmp_path / "plain").runs[0]
    with_tasks = tiny_plan(tmp_path / "tasks", inference={"lm_eval": LOCAL}).runs[0]
    fewer = tiny_plan(tmp_path / "fewer", inference={"lm_eval": {**LOCAL, "limit": 5}}).runs[0]
    assert len({grid_evaluation.eval_set(r) for r in (plain, with_tasks, fewer)}) == 3
    assert "lm_eval" not in json.dumps(plain.inference.model_dump(mode="json", exclude_none=True))


def test_planning_reads_task_names_without_importing_torch_or_lm_eval(tmp_path, tiny_experiment):
    path = tiny_experiment(tmp_path, inference={"lm_eval": {"tasks": ["arc_eazy"]}})
    code = textwrap.dedent(f"""
        import sys
        from launcher.grid import plan
        try:
            plan({str(path)!r})
        except Exception as exc:
            print(exc)
        print(sorted(m for m in ("torch", "transformers", "lm_eval", "datasets") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "close names: 'arc_easy'" in done.stdout, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- the job and the report (slow) ----------------------------------------------------------------


@pytest.mark.slow
def test_local_task_scores_base_and_each_adapter_in_the_report(tmp_path, tiny_plan):
    p = tiny_plan(
        tmp_path,
        inference={"prompts": [], "lm_eval": {**LOCAL, "batch_size": 16}},
        grid={"train.learning_rate": [0.05, 0.01]},
        train={"max_steps": 4, "save_steps": 4},
    )
    for run in p.runs:
        log = tmp_path / f"{run.run_id}.train.log"
        assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=tmp_path) == 0, tail(log)
    listing = evaluation.write_runs_file(list(p.runs), tmp_path / "runs")
    log = tmp_path / "evaluate.log"
    assert run_job("training.evaluate_grid", str(listing), log=log, cwd=tmp_path) == 0, tail(log)
    output = log.read_text()
    assert output.count("loading base model") == 1
    assert output.count("lm-eval base model: qlaunch_numbers acc") == 1  # the base scored once

    summaries = [json.loads((RunPaths.of(run).inference / "summary.json").read_text()) for run in p.runs]
    for summary in summaries:
        task = summary["lm_eval"]["tasks"]["qlaunch_numbers"]
        assert task["metric"] == "acc" and task["n"] == 20
        assert 0 <= task["base"] <= 1 and 0 <= task["tuned"] <= 1
        assert set(task["metrics"]["tuned"]) == {"acc", "acc_norm"}
    assert (
        summaries[0]["lm_eval"]["tasks"]["qlaunch_numbers"]["base"]
        == summaries[1]["lm_eval"]["tasks"]["qlaunch_numbers"]["base"]
    )
    base_file = json.loads((grid_evaluation.folder(p.runs) / grid_evaluation.LM_EVAL_FILE).read_text())
    assert (
        base_file["base"][0]["base"]["qlaunch_numbers"]["metrics"]["acc"]
        == summaries[0]["lm_eval"]["tasks"]["qlaunch_numbers"]["base"]
    )
    # The adapters answered, not the base, each its own: the log-likelihood scores move.
    scores = [s["lm_eval"]["tasks"]["qlaunch_numbers"]["metrics"] for s in summaries]
    assert any(m["tuned"] != m["base"] for m in scores), scores
    assert scores[0]["tuned"] != scores[1]["tuned"], scores

    out = tmp_path / "report"
    env = {**os.environ, "QLAUNCH_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "report", str(p.source), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    assert "Standard benchmarks (lm-eval)" in html and "qlaunch_numbers acc base → tuned" in html
    assert "## Standard benchmarks (lm-eval)" in markdown
    for run, summary in zip(p.runs, summaries):
        row = next(r for r in report["runs"] if r["run_id"] == run.run_id)
        task = summary["lm_eval"]["tasks"]["qlaunch_numbers"]
        assert row["benchmarks"] == [
            {"task": "qlaunch_numbers", "metric": "acc", "base": task["base"], "tuned": task["tuned"], "n": 20}
        ]
        cell = f"{task['base']:.3f} → {task['tuned']:.3f}"
        assert cell in html and cell in markdown


def test_benchmark_scores_reach_tensorboard_and_mlflow_beside_the_runs_metrics(tmp_path, tiny_plan, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.tracking import mlflow_uri, record_benchmarks, tensorboard_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tiny_plan(tmp_path, inference={"lm_eval": LOCAL}, tracking={"report_to": ["tensorboard", "mlflow"]}).runs[0]
    field = {
        "tasks": {
            "qlaunch_numbers": {
                "metric": "acc",
                "base": 0.1,
                "tuned": 0.15,
                "n": 20,
                "metrics": {"tuned": {"acc": 0.15, "acc_norm": 0.35}, "base": {"acc": 0.1, "acc_norm": 0.1}},
            }
        }
    }
    record_benchmarks(run, field, step=8)
    reader = EventAccumulator(str(tensorboard_dir(run)))
    reader.Reload()
    assert [(e.step, round(e.value, 3)) for e in reader.Scalars("lm_eval/qlaunch_numbers/acc")] == [(8, 0.15)]
    assert reader.Scalars("lm_eval/qlaunch_numbers/acc_base")[0].value == pytest.approx(0.1)
    client = MlflowClient(tracking_uri=mlflow_uri(run))
    experiment = client.get_experiment_by_name(run.name)
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`qlaunch.run_id` = '{run.run_id}'")
    assert found.data.metrics["lm_eval/qlaunch_numbers/acc_norm"] == pytest.approx(0.35)
    assert found.data.metrics["lm_eval/qlaunch_numbers/acc_norm_base"] == pytest.approx(0.1)


def test_kubernetes_refuses_a_local_task_folder_the_pods_cannot_read(tmp_path, tiny_experiment):
    path = tiny_experiment(tmp_path, backend="kubernetes", inference={"lm_eval": LOCAL})
    problems = [str(p) for p in check_plan(plan(path)) if "lm_eval" in p.key]
    assert len(problems) == 1 and "inference.lm_eval.include_path" in problems[0], problems
    assert "the pods cannot read a task folder of this machine" in problems[0]


def test_the_job_refuses_an_unknown_task_with_lm_evals_own_index(tmp_path, tiny_plan):
    """A run.yaml the plan-time check never saw (another launcher, --skip-input-checks): the job
    names the task before it loads the model."""
    from training.lm_eval_run import problem

    run = tiny_plan(tmp_path, inference={"lm_eval": LOCAL}).runs[0]
    assert problem(run) is None
    run.inference.lm_eval.tasks = ["qlaunch_numbrs"]
    message = problem(run)
    assert message.startswith("inference.lm_eval.tasks: no such lm-eval task: 'qlaunch_numbrs'")
    assert "close names: qlaunch_numbers" in message
