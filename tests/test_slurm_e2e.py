"""Real QLoRA runs through the real test cluster (slurm/cluster.sh up): a grid that trains and
then answers prompts in its dependent inference jobs, and a run preempted twice (scontrol
requeue, then a high-priority job taking the node) that resumes from its checkpoints.

CPU jobs of 1 CPU each, so the two runs of the grid share the 2-core node.
"""

from __future__ import annotations

import calendar
import io
import json
import re
import shutil
import subprocess
import threading
import time

import pytest
from slurm_support import (
    PYTHON,
    cancel_after,  # noqa: F401 - fixture
    plan,
    require_cluster,
    scheduler_jobs,
    unique_name,
    wait_for,
)

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.progress import read_events, summarize
from launcher.job.storage import RunPaths

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session", autouse=True)
def _cluster():
    # Session scope: checked before the session's tiny model is built, not after.
    require_cluster()


def _slurm_sections(name: str, **sections) -> dict:
    """tests/conftest.py's tiny experiment, as Slurm jobs run by this test's python."""
    environment = {"python": PYTHON, **sections.pop("environment", {})}
    return {"name": name, "backend": "slurm", "environment": environment, **sections}


def _events(run, kind: str) -> list[dict]:
    return [e for e in read_events(RunPaths.of(run).progress) if e.get("event") == kind]


def test_grid_trains_then_runs_inference(tmp_path, tiny_experiment, cancel_after):
    literal = "a b $(touch pwned) 'q' \"qq\""
    p = plan(
        tiny_experiment(
            tmp_path,
            **_slurm_sections(
                unique_name("grid"),
                environment={
                    "variables": {"QLAUNCH_LITERAL": literal},
                    "setup": ['printf %s "$QLAUNCH_LITERAL" > environment-check.txt'],
                },
                grid={"lora.r": [4, 8]},
            ),
        )
    )
    cancel_after(p)
    backend = SlurmBackend()
    report = backend.submit(p)
    assert all(len(job_ids) == 2 for job_ids in report.submitted.values())

    def finished():
        statuses = backend.status(p)
        if any(
            s.state in (State.FAILED, State.CANCELLED) or s.infer_state in (State.FAILED, State.CANCELLED)
            for s in statuses.values()
        ):
            logs = {
                r.run_id: RunPaths.of(r).train_log.read_text()[-3000:]
                for r in p.runs
                if RunPaths.of(r).train_log.exists()
            }
            raise AssertionError(f"a job failed: {statuses}\n{logs}")
        return all(s.state == State.COMPLETED and s.infer_state == State.COMPLETED for s in statuses.values())

    wait_for(finished, timeout=600, message="training and inference of both runs", interval=5)
    for run in p.runs:
        paths = RunPaths.of(run)
        assert (paths.adapter / "adapter_config.json").is_file()
        assert json.loads(paths.metrics.read_text())["global_step"] == run.train.max_steps
        results = [json.loads(line) for line in (paths.inference / "results.jsonl").read_text().splitlines()]
        assert [row["prompt"] for row in results] == run.inference.prompts
        assert all(row["tuned"] for row in results)
        assert paths.infer_log.is_file()
        # environment.variables arrive exactly as typed, nothing in them is executed.
        assert (paths.root / "environment-check.txt").read_text() == literal
        assert not (paths.root / "pwned").exists()
    states = scheduler_jobs(*(job for ids in report.submitted.values() for job in ids))
    assert set(states.values()) == {"COMPLETED"}


def test_grid_evaluation_starts_after_every_training_job_and_names_the_run_that_did_not_train(
    tmp_path, tiny_experiment, cancel_after
):
    p = plan(tiny_experiment(tmp_path, **_slurm_sections(unique_name("evalgrid"), grid={"lora.r": [4, 8]})))
    cancel_after(p)
    trained, stopped = p.runs
    backend = SlurmBackend()
    report = backend.submit(p)
    (train_ok, evaluate), (train_stopped, same) = report.submitted[trained.run_id], report.submitted[stopped.run_id]
    assert evaluate == same  # one evaluation job for the grid
    shown = subprocess.run(["scontrol", "show", "job", evaluate], capture_output=True, text=True).stdout
    # One training array for the grid: the evaluation job waits for all of its tasks.
    assert train_ok.split("_")[0] == train_stopped.split("_")[0]
    assert f"afterany:{train_ok.split('_')[0]}_*" in shown
    subprocess.run(["scancel", train_stopped], check=True)

    def evaluated():
        states = scheduler_jobs(evaluate)
        return (
            states.get(evaluate) in ("COMPLETED", "FAILED") or RunPaths.of(trained).inference_completed() and not states
        )

    wait_for(evaluated, timeout=600, message="the grid evaluation job", interval=5)
    wait_for(
        lambda: scheduler_jobs(evaluate).get(evaluate, "COMPLETED") == "COMPLETED",
        timeout=60,
        message="the evaluation job to end",
    )
    folder = RunPaths.of(trained).root.parent / "evaluation"
    log = (folder / "evaluate.log").read_text()
    assert log.count("loading base model") == 1
    # It started once the last training job had ended (afterany): after the adapter was written.
    started = re.search(r"qlaunch: (\S+Z) job", log).group(1)
    finished = RunPaths.of(trained).metrics.stat().st_mtime
    assert calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) >= int(finished) - 1
    outcomes = json.loads((folder / "evaluation.json").read_text())["runs"]
    assert outcomes[trained.run_id] == {"outcome": "evaluated"}
    assert outcomes[stopped.run_id]["outcome"] == "not evaluated"
    assert f"not evaluated: {stopped.run_id}: " in log
    results = [json.loads(line) for line in (RunPaths.of(trained).inference / "results.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in results] == trained.inference.prompts and all(row["tuned"] for row in results)
    statuses = backend.status(p)
    assert statuses[trained.run_id].infer_state == State.COMPLETED
    assert statuses[stopped.run_id].state in (State.CANCELLED, State.UNKNOWN)  # UNKNOWN: past MinJobAge

    # `qlaunch evaluate --backend slurm`: a job now, for what is trained and not scored.
    shutil.rmtree(RunPaths.of(trained).inference)
    done = subprocess.run(
        [PYTHON, "-m", "launcher.cli", "evaluate", str(p.source), "--backend", "slurm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{stopped.run_id} skipped: not trained yet" in done.stdout
    job = re.search(r"grid evaluation job (\d+) submitted", done.stdout).group(1)
    wait_for(
        lambda: RunPaths.of(trained).inference_completed() and scheduler_jobs(job).get(job, "COMPLETED") == "COMPLETED",
        timeout=300,
        message="qlaunch evaluate's job",
        interval=3,
    )
    assert (folder / "evaluate.log").read_text().count("loading base model") == 2


def test_preempted_run_resumes_from_its_checkpoint(tmp_path, tiny_experiment, cancel_after):
    # The tiny model steps fast; enough steps that both preemptions land mid-training.
    max_steps = 60
    p = plan(
        tiny_experiment(
            tmp_path,
            **_slurm_sections(
                unique_name("preempt"),
                train={"max_steps": max_steps, "save_steps": 20},
                inference={"enabled": False},
            ),
        )
    )
    cancel_after(p)
    (run,) = p.runs
    backend = SlurmBackend()
    (job_id,) = backend.submit(p).submitted[run.run_id]

    followed = io.StringIO()
    follower = threading.Thread(target=backend.logs, args=(p, run), kwargs={"follow": True, "out": followed})
    follower.start()

    def training_in_attempt(attempt: int):
        starts = _events(run, "start")
        if len(starts) < attempt:
            return False
        first = starts[attempt - 1]["step"]
        return any(e["step"] > first and e["time"] >= starts[attempt - 1]["time"] for e in _events(run, "step"))

    # 1. scontrol requeue, as an admin or a user would.
    wait_for(lambda: training_in_attempt(1), timeout=300, message="first attempt training", interval=0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # 2. a job in the high-priority partition that needs the whole node.
    wait_for(lambda: training_in_attempt(2), timeout=300, message="second attempt training", interval=0.2)
    high = subprocess.run(
        ["sbatch", "--parsable", "--partition=high", "--exclusive", "--output=/dev/null", "--wrap=sleep 2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for(lambda: scheduler_jobs(high).get(high) == "COMPLETED", timeout=120, message="the high-priority job")

    wait_for(lambda: backend.status(p)[run.run_id].state == State.COMPLETED, timeout=400, message="run completed")
    follower.join(timeout=60)
    assert not follower.is_alive()

    progress = summarize(read_events(RunPaths.of(run).progress))
    assert progress.finished and progress.step == max_steps
    assert progress.restarts == 2
    assert all(step > 0 for step in progress.resumed_from), progress.resumed_from
    assert progress.resumed_from[1] > progress.resumed_from[0]
    # scontrol requeue: TERM to every process of the job. Preemption: the job's own
    # --signal=USR1 to the step's processes (as before a time limit), then TERM.
    assert [e["signal"] for e in _events(run, "preempted")] == ["SIGTERM", "SIGUSR1"]
    # Through training.launch, as on every backend: one stop request, the rest absorbed.
    log = RunPaths.of(run).train_log.read_text()
    assert log.count("asking the workers to checkpoint") == 2 and "accelerate.commands" not in log
    assert json.loads(RunPaths.of(run).metrics.read_text())["global_step"] == max_steps
    status = backend.status(p)[run.run_id]
    assert status.restarts == 2 and status.job_ids == [job_id]
    # `qlaunch logs --follow` stayed on the run through both requeues, to the end.
    text = followed.getvalue()
    for attempt in ("(restart 0)", "(restart 1)", "(restart 2)", "training step exited with status 0"):
        assert attempt in text


def test_a_preempted_array_task_is_requeued_alone_and_resumes(tmp_path, tiny_experiment, cancel_after):
    """Two runs of one training array, one per node of the `multi` partition (2 CPUs each: a
    whole node); a `multi-high` job takes one node: that task alone is requeued and resumes
    from its checkpoint, the other trains on untouched."""
    nodes = subprocess.run(
        ["sinfo", "--noheader", "--partition=multi", "--format=%D"], capture_output=True, text=True
    ).stdout.split()
    if not nodes or int(nodes[0]) < 2:
        pytest.fail("the test cluster has no two-node partition `multi`: run bash slurm/cluster.sh up --nodes 2")
    max_steps = 60
    p = plan(
        tiny_experiment(
            tmp_path,
            **_slurm_sections(
                unique_name("arrpre"),
                train={"max_steps": max_steps, "save_steps": 20},
                inference={"enabled": False},
                resources={"gpus_per_node": 0, "cpus_per_task": 2, "memory": "2G"},
                slurm={"partition": "multi"},
                grid={"lora.r": [4, 8]},
            ),
        )
    )
    cancel_after(p)
    backend = SlurmBackend()
    report = backend.submit(p)
    tasks = {run.run_id: report.submitted[run.run_id][0] for run in p.runs}
    assert len({task.split("_")[0] for task in tasks.values()}) == 1  # one array
    hit, spared = p.runs
    # `qlaunch logs --follow <run>` on the task that will be preempted, from its submission on.
    followed = io.StringIO()
    follower = threading.Thread(target=backend.logs, args=(p, hit), kwargs={"follow": True, "out": followed})
    follower.start()

    def training(run) -> bool:
        return any(e["step"] > 0 for e in _events(run, "step"))

    wait_for(lambda: all(training(run) for run in p.runs), timeout=300, message="both tasks training", interval=0.5)
    node = subprocess.run(
        ["squeue", "--noheader", "--array", f"--jobs={tasks[hit.run_id]}", "--format=%N"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert node, "the task's node"
    high = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=multi-high",
            f"--nodelist={node}",
            "--exclusive",
            "--output=/dev/null",
            "--wrap=sleep 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for(lambda: scheduler_jobs(high).get(high) == "COMPLETED", timeout=120, message="the high-priority job")
    wait_for(
        lambda: all(s.state == State.COMPLETED for s in backend.status(p).values()),
        timeout=400,
        message="both runs completed",
    )

    statuses = backend.status(p)
    assert statuses[hit.run_id].restarts == 1 and statuses[spared.run_id].restarts == 0
    hit_progress = summarize(read_events(RunPaths.of(hit).progress))
    assert hit_progress.finished and hit_progress.restarts == 1 and hit_progress.resumed_from[0] > 0
    assert _events(spared, "preempted") == [] and len(_events(spared, "start")) == 1
    assert statuses[hit.run_id].job_ids == [tasks[hit.run_id]]  # the same task, requeued
    follower.join(timeout=60)
    assert not follower.is_alive()
    # Both attempts, in order, in the run's train.log as `qlaunch logs` shows it and as `qlaunch
    # logs --follow` followed it across the requeue to the end. (Not Slurm's "CANCELLED AT" line:
    # slurmstepd writes it only when the batch shell is still running at the requeue, a race.)
    shown = io.StringIO()
    backend.logs(p, hit, follow=False, out=shown)
    for how, text in (("logs", shown.getvalue()), ("logs --follow", followed.getvalue())):
        found = [line for line in text.splitlines() if line.startswith("qlaunch: ")]
        assert "(restart 0)" in text and "(restart 1)" in text, (how, found)
        assert text.index("(restart 0)") < text.index("(restart 1)"), (how, found)
        assert found[-1].endswith("training step exited with status 0"), (how, found)
