"""The Slurm backend against the real test cluster (slurm/cluster.sh up), without training.

Jobs here are submitted held (`--hold` through slurm.extra_directives): Slurm accepts,
queues, lists and cancels them like any other, and none of them uses a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_support import (
    cancel_after,  # noqa: F401 - fixture
    plan,
    require_cluster,
    scheduler_jobs,
    unique_name,
    write_experiment,
)

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.errors import BackendError
from launcher.job.storage import RunPaths, write_json

HELD = {"extra_directives": ["--hold"]}
LOGGED_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo")


@pytest.fixture
def cluster():
    require_cluster()


def _submission_ids(run) -> list[str]:
    record = json.loads(RunPaths.of(run).submission.read_text())
    return [job["job_id"] for job in record["jobs"]]


def _wrappers(folder: Path, refuse_after: int | None = None) -> Path:
    """Real executables in front of the real Slurm commands: each logs its call, then execs the
    real one. With refuse_after=N, the sbatch wrapper refuses every real submission after the
    N-th the way a site submit limit does."""
    folder.mkdir()
    log = folder / "calls.log"
    for name in LOGGED_COMMANDS:
        real = shutil.which(name)
        assert real, name
        refuse = ""
        if name == "sbatch" and refuse_after is not None:
            refuse = f"""
case " $* " in *" --test-only "*) ;; *)
    n=$(( $(cat "{folder}/submitted" 2>/dev/null || echo 0) + 1 )); echo "$n" > "{folder}/submitted"
    if [ "$n" -gt {refuse_after} ]; then
        echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)" >&2
        exit 1
    fi;;
esac"""
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"{refuse}\nexec {real} "$@"\n')
        script.chmod(0o755)
    return log


def _calls(log: Path, name: str) -> list[str]:
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.split(" ", 1)[0] == name]


# ---- clear errors ------------------------------------------------------------------------------
def test_missing_sbatch_is_one_clear_error(tmp_path, monkeypatch):
    p = plan(write_experiment(tmp_path, unique_name("nosbatch"), slurm=HELD))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BackendError, match="sbatch not found on PATH") as error:
        SlurmBackend().submit(p)
    assert "slurm/cluster.sh up" in str(error.value)
    assert not any(RunPaths.of(run).submission.exists() for run in p.runs)


@pytest.mark.slurm
def test_unknown_partition_is_refused_before_anything_is_submitted(cluster, tmp_path):
    p = plan(write_experiment(tmp_path, unique_name("nopart"), slurm={**HELD, "partition": "nosuch"}))
    with pytest.raises(BackendError) as error:
        SlurmBackend().submit(p)
    message = str(error.value)
    assert "invalid partition" in message and "nosuch" in message
    assert "normal" in message and "high" in message  # the partitions that do exist
    assert not any(RunPaths.of(run).root.exists() for run in p.runs)


@pytest.mark.slurm
def test_request_slurm_cannot_satisfy_is_refused_with_its_reason(cluster, tmp_path):
    name = unique_name("toobig")
    p = plan(write_experiment(tmp_path, name, slurm=HELD, resources={"memory": "4000G"}, grid={"train.seed": [1, 2]}))
    with pytest.raises(BackendError, match="Requested node configuration is not available"):
        SlurmBackend().submit(p)
    assert not any(RunPaths.of(run).submission.exists() for run in p.runs)
    queued = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j"], capture_output=True, text=True)
    assert name not in queued.stdout


# ---- submit / resubmit / cancel ------------------------------------------------------------------
@pytest.mark.slurm
def test_submit_resubmit_cancel_and_force(cluster, tmp_path, cancel_after):
    comment = 'qlaunch test #1 "quoted"'
    p = plan(
        write_experiment(
            tmp_path,
            unique_name("held"),
            slurm={"extra_directives": ["--hold", f"--comment={comment}"]},
            inference={"per_run": True},  # an inference job per run (grid evaluation: test_slurm_e2e)
            grid={"train.seed": [1, 2, 3]},
        )
    )
    cancel_after(p)
    backend = SlurmBackend()

    report = backend.submit(p)
    assert sorted(report.submitted) == sorted(run.run_id for run in p.runs)
    for run in p.runs:
        train_id, infer_id = report.submitted[run.run_id]
        paths = RunPaths.of(run)
        assert _submission_ids(run) == [train_id, infer_id]
        # What was submitted is the reviewed file, next to the run config it names.
        assert paths.config.is_file() and (paths.root / "train.sbatch").is_file()
        shown = subprocess.run(["scontrol", "show", "job", infer_id], capture_output=True, text=True).stdout
        # Both are tasks of the grid's arrays: inference task N waits for training task N.
        (train_array, task), (_, same) = train_id.split("_"), infer_id.split("_")
        assert task == same and f"Dependency=aftercorr:{train_array}_*" in shown
        assert (
            f"Comment={comment}"
            in subprocess.run(["scontrol", "show", "job", train_id], capture_output=True, text=True).stdout
        )

    statuses = backend.status(p)
    for run in p.runs:
        status = statuses[run.run_id]
        assert status.state == State.PENDING and "Held" in status.detail
        assert status.infer_state == State.PENDING
        assert status.job_ids == [report.submitted[run.run_id][0]]

    again = backend.submit(p)
    assert again.submitted == {}
    assert set(again.skipped) == {run.run_id for run in p.runs}
    assert all(len(_submission_ids(run)) == 2 for run in p.runs)

    first = p.runs[0]
    assert backend.cancel(p, [first]) == [first.run_id]
    # A pending array task that is cancelled leaves squeue at once; its array's other tasks stay.
    cancelled = scheduler_jobs(*report.submitted[first.run_id])
    assert set(cancelled.values()) <= {"CANCELLED"}
    others = scheduler_jobs(*(job for run in p.runs[1:] for job in report.submitted[run.run_id]))
    assert set(others.values()) == {"PENDING"} and len(others) == 4
    statuses = backend.status(p)
    assert statuses[first.run_id].state == State.CANCELLED
    assert statuses[p.runs[1].run_id].state == State.PENDING
    assert backend.cancel(p, [first]) == []  # nothing left to cancel

    # A cancelled run is submitted again; the others are still queued.
    third = backend.submit(p)
    assert list(third.submitted) == [first.run_id]

    old = {run.run_id: _submission_ids(run)[-2:] for run in p.runs}
    forced = backend.submit(p, force=True)
    assert sorted(forced.submitted) == sorted(run.run_id for run in p.runs)
    replaced = scheduler_jobs(*(job for ids in old.values() for job in ids))
    assert set(replaced.values()) <= {"CANCELLED"}


@pytest.mark.slurm
def test_failure_midway_names_what_was_submitted_and_a_rerun_completes(cluster, tmp_path, monkeypatch, cancel_after):
    p = plan(
        write_experiment(
            tmp_path, unique_name("midway"), slurm=HELD, inference={"per_run": True}, grid={"train.seed": [1, 2, 3]}
        )
    )
    cancel_after(p)
    wrappers = tmp_path / "wrappers"
    _wrappers(wrappers, refuse_after=1)  # the training array, then refusals
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    first, second, third = p.runs

    with pytest.raises(BackendError) as error:
        SlurmBackend().submit(p)
    message = str(error.value)
    assert "job submit limit" in message  # sbatch's own words
    # The training array went in, the inference array did not: every run's training is queued.
    assert "submitted before this failure: none; partly submitted: " in message
    assert all(run.run_id in message for run in p.runs)
    assert all(len(_submission_ids(run)) == 1 for run in p.runs)

    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    report = SlurmBackend().submit(p)
    # Only the missing inference, as one array paired task by task with the training array.
    assert sorted(report.submitted) == sorted(run.run_id for run in p.runs)
    assert all(len(jobs) == 1 for jobs in report.submitted.values())
    assert len({jobs[0].split("_")[0] for jobs in report.submitted.values()}) == 1
    for run in p.runs:
        train_id, infer_id = _submission_ids(run)
        assert train_id.split("_")[1] == infer_id.split("_")[1]


# ---- status ----------------------------------------------------------------------------------
@pytest.mark.slurm
def test_status_of_200_runs_costs_one_squeue_call(cluster, tmp_path, monkeypatch, cancel_after):
    p = plan(
        write_experiment(
            tmp_path,
            unique_name("grid200"),
            slurm=HELD,
            inference={"enabled": False},
            grid={"train.seed": list(range(200))},
        )
    )
    cancel_after(p)
    assert len(p.runs) == 200
    backend = SlurmBackend()
    backend.submit(p)

    log = _wrappers(tmp_path / "wrappers")
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrappers'}{os.pathsep}{os.environ['PATH']}")
    for _ in range(3):
        statuses = backend.status(p)
        assert len(statuses) == 200
        assert {status.state for status in statuses.values()} == {State.PENDING}
    assert len(_calls(log, "squeue")) == 3
    assert _calls(log, "sacct") == []  # every job is still in squeue: nothing to look up

    assert len(backend.cancel(p, list(p.runs))) == 200
    assert len(_calls(log, "scancel")) == 1
    assert len(_calls(log, "squeue")) == 4


@pytest.mark.slurm
def test_jobs_slurm_forgot_are_resolved_from_storage(cluster, tmp_path):
    p = plan(write_experiment(tmp_path, unique_name("gone"), grid={"train.seed": [1, 2, 3]}))
    done, failed, stopped = p.runs
    forgotten = "999999"  # a job id this cluster never handed out: as if purged after MinJobAge
    for run in p.runs:
        write_json(RunPaths.of(run).submission, {"backend": "slurm", "jobs": [{"kind": "train", "job_id": forgotten}]})
    paths = RunPaths.of(done)
    (paths.adapter).mkdir(parents=True)
    (paths.adapter / "adapter_config.json").write_text("{}")
    write_json(paths.metrics, {"train_loss": 1.0})
    (RunPaths.of(failed).progress).write_text(
        '{"event": "start", "step": 0, "time": 1}\n{"event": "error", "step": 3, "time": 2, "message": "CUDA out of memory"}\n'
    )
    (RunPaths.of(stopped).progress).write_text(
        '{"event": "start", "step": 0, "time": 1}\n{"event": "preempted", "step": 7, "time": 2, "signal": "SIGTERM"}\n'
    )
    statuses = SlurmBackend().status(p)
    assert statuses[done.run_id].state == State.COMPLETED
    assert statuses[failed.run_id].state == State.FAILED
    assert "CUDA out of memory" in statuses[failed.run_id].detail
    assert statuses[stopped.run_id].state == State.UNKNOWN
    assert "step 7" in statuses[stopped.run_id].detail
    # One run alone: squeue calls a single unknown job id an error; the answer is the same.
    alone = SlurmBackend().status(type(p)(p.experiment, p.source, p.storage_root, (done,)))
    assert alone[done.run_id].state == State.COMPLETED
