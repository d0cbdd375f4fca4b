"""A grid as Slurm job arrays (issue #28) on the real test cluster (slurm/cluster.sh up, which
sets MaxArraySize=100), without training.

Jobs are submitted held (`--hold` through slurm.extra_directives), as in test_slurm_cluster:
Slurm accepts, lists, throttles and cancels their tasks like any other, and none uses a CPU.
The sbatch/squeue/scancel/scontrol in front of the real ones only log their calls (the
wrappers of test_slurm_cluster). The limit tests set a real per-user limit, MaxSubmitJobs, with
`sacctmgr` on the cluster's own slurmdbd (cluster.sh up runs one, with MariaDB), which slurmctld
enforces: what qlaunch reads is what Slurm refuses past.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_support import (
    PYTHON,
    REPO,
    cancel_after,  # noqa: F401 - fixture
    plan,
    require_cluster,
    scheduler_jobs,
    unique_name,
    wait_for,
    write_experiment,
)
from test_slurm_cluster import HELD, _calls, _wrappers

from launcher.backends.base import WAITING, State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.storage import RunPaths, write_json

pytestmark = [pytest.mark.slurm]


@pytest.fixture
def cluster():
    require_cluster()


def _max_array_size() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return int(re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M).group(1))


def _submissions(log: Path) -> list[str]:
    """The sbatch calls that submitted something (not --test-only)."""
    return [call for call in _calls(log, "sbatch") if "--test-only" not in call]


def _array(call: str) -> str:
    return re.search(r"--array=(\S+)", call).group(1)


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_cancel_one_task_then_resubmit_two_as_one_array_over_their_indices(
    cluster, tmp_path, monkeypatch, cancel_after
):
    p = plan(
        write_experiment(
            tmp_path, unique_name("arr"), slurm=HELD, inference={"enabled": False}, grid={"train.seed": [1, 2, 3, 4, 5]}
        )
    )
    cancel_after(p)
    log = _wrappers(tmp_path / "wrappers")
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrappers'}{os.pathsep}{os.environ['PATH']}")
    backend = SlurmBackend()

    report = backend.submit(p)
    (call,) = _submissions(log)  # the whole grid: one sbatch
    assert _array(call) == "0-4"
    ids = {run.run_id: report.submitted[run.run_id][0] for run in p.runs}
    array = ids[p.runs[0].run_id].split("_")[0]
    assert ids == {run.run_id: f"{array}_{i}" for i, run in enumerate(p.runs)}
    record = json.loads(RunPaths.of(p.runs[3]).submission.read_text())["jobs"][0]
    assert (record["array_job_id"], record["array_task_id"]) == (array, 3)
    # Each task writes to its own run's log: Slurm's output path is a link to it.
    assert all((RunPaths.of(run).root / "train.sbatch").is_file() for run in p.runs)

    # cancel <run>: that task alone.
    second, fourth = p.runs[1], p.runs[3]
    assert backend.cancel(p, [second]) == [second.run_id]
    assert _calls(log, "scancel")[-1] == f"scancel {array}_1"
    left = scheduler_jobs(*ids.values())
    assert sorted(left) == sorted(ids[run.run_id] for run in p.runs if run is not second)
    assert set(left.values()) == {"PENDING"}
    statuses = backend.status(p)
    assert statuses[second.run_id].state == State.CANCELLED
    assert {statuses[run.run_id].state for run in p.runs if run is not second} == {State.PENDING}
    backend.cancel(p, [fourth])

    # Resubmit: exactly the two cancelled runs, as one array over their indices.
    again = backend.submit(p)
    assert sorted(again.submitted) == sorted([second.run_id, fourth.run_id])
    assert len(again.skipped) == 3
    first_call, second_call = _submissions(log)
    assert _array(second_call) == "1,3"
    assert first_call.split()[-1] == second_call.split()[-1]  # the same array script and task list
    new = again.submitted[second.run_id][0].split("_")[0]
    assert again.submitted == {second.run_id: [f"{new}_1"], fourth.run_id: [f"{new}_3"]}
    assert backend.submit(p).submitted == {}  # nothing missing now: no sbatch
    assert len(_submissions(log)) == 2


def test_a_grid_larger_than_max_array_size_goes_out_as_several_arrays(cluster, tmp_path, monkeypatch, cancel_after):
    limit = _max_array_size()
    assert limit == 100, "slurm/cluster.sh sets MaxArraySize=100"
    runs = 2 * limit + 50
    p = plan(
        write_experiment(
            tmp_path,
            unique_name("big"),
            slurm=HELD,
            inference={"enabled": False},
            grid={"train.seed": list(range(runs))},
        )
    )
    cancel_after(p)
    backend = SlurmBackend()
    prepared = backend.prepare(p)
    # slurmdbd answers sacctmgr (no per-user limit set): every limit read, none in the way; the
    # grid is cut by MaxArraySize.
    assert prepared.checked == "accepted by sbatch --test-only" and prepared.notes == []

    log = _wrappers(tmp_path / "wrappers")
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrappers'}{os.pathsep}{os.environ['PATH']}")
    report = backend.submit(p)
    calls = _submissions(log)
    assert [_array(call) for call in calls] == ["0-99", "0-99", "0-49"]
    assert len(report.submitted) == runs
    arrays = {jobs[0].split("_")[0] for jobs in report.submitted.values()}
    assert len(arrays) == 3
    statuses = backend.status(p)
    assert {status.state for status in statuses.values()} == {State.PENDING}
    assert len(_calls(log, "squeue")) == 2  # one in submit (the queue, for the limits), one in status
    assert backend.submit(p).submitted == {} and len(_submissions(log)) == 3
    # The whole grid: one scancel naming the three arrays.
    assert len(backend.cancel(p, list(p.runs))) == runs
    assert sorted(_calls(log, "scancel")[-1].split()[1:]) == sorted(arrays)


# submission.json as qlaunch wrote it before arrays: one training job per run.
RECORDED = {
    "backend": "slurm",
    "jobs": [{"kind": "train", "job_id": "{job}", "submitted_at": 1796670000.123, "script": "train.sbatch"}],
}


def test_runs_submitted_one_job_each_before_arrays_are_still_read(cluster, tmp_path, cancel_after):
    p = plan(
        write_experiment(
            tmp_path, unique_name("old"), slurm=HELD, inference={"enabled": False}, grid={"train.seed": [1, 2, 3]}
        )
    )
    cancel_after(p)
    backend = SlurmBackend()
    backend.render(p, tmp_path / "rendered")
    jobs = {}
    for run in p.runs:  # what the old qlaunch did: sbatch of the run's own script, one job each
        folder = RunPaths.of(run).root
        folder.mkdir(parents=True)
        (folder / "train.sbatch").write_text((tmp_path / "rendered" / f"{run.run_id}.train.sbatch").read_text())
        jobs[run.run_id] = subprocess.run(
            ["sbatch", "--parsable", "train.sbatch"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        text = json.dumps(RECORDED).replace("{job}", jobs[run.run_id])
        write_json(RunPaths.of(run).submission, json.loads(text))

    assert {status.state for status in backend.status(p).values()} == {State.PENDING}
    assert backend.submit(p).submitted == {}  # all three still queued: nothing submitted
    old = p.runs[0]
    assert backend.cancel(p, [old]) == [old.run_id]
    assert scheduler_jobs(jobs[old.run_id]) == {jobs[old.run_id]: "CANCELLED"}
    assert backend.status(p)[old.run_id].state == State.CANCELLED
    again = backend.submit(p)
    (task,) = again.submitted[old.run_id]
    assert task.endswith("_0") and list(again.submitted) == [old.run_id]  # task 0: the grid's first run


def test_throttle_renders_percent_k_and_qlaunch_throttle_changes_it_on_the_queued_arrays(
    cluster, tmp_path, cancel_after
):
    p = plan(
        write_experiment(
            tmp_path,
            unique_name("thr"),
            slurm={**HELD, "array_parallelism": 2},
            inference={"per_run": True},
            grid={"train.seed": [1, 2, 3]},
        )
    )
    cancel_after(p)
    report = SlurmBackend().submit(p)
    train, infer = report.submitted[p.runs[0].run_id]
    assert _scontrol(train)["ArrayTaskThrottle"] == "2" and _scontrol(infer)["ArrayTaskThrottle"] == "2"
    done = subprocess.run(
        [PYTHON, "-m", "launcher.cli", "throttle", str(p.source), "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "at most 1 tasks at once" in done.stdout
    assert _scontrol(train)["ArrayTaskThrottle"] == "1" and _scontrol(infer)["ArrayTaskThrottle"] == "1"


_QUEUED = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"


@pytest.fixture
def max_submit_jobs(cluster):
    """set(name, room): this user's MaxSubmitJobs (sacctmgr, on the test cluster's slurmdbd) set
    to `room` more jobs than the user has queued outside experiment `name` (other tests share
    the cluster); lifted again (-1) after the test."""
    user = os.environ.get("USER") or getpass.getuser()
    shown = subprocess.run(
        ["sacctmgr", "--noheader", "--parsable2", "show", "assoc", f"user={user}", "format=User"],
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0 or user not in shown.stdout.split():
        pytest.fail(f"sacctmgr has no association for {user}: {shown.stderr.strip()} (bash slurm/cluster.sh up)")

    def modify(value: int) -> None:
        subprocess.run(
            ["sacctmgr", "-i", "modify", "user", f"name={user}", "set", f"MaxSubmitJobs={value}"],
            check=True,
            capture_output=True,
        )

    def set_room(name: str, room: int) -> int:
        names = subprocess.run(
            ["squeue", "--noheader", "--array", f"--user={user}", f"--states={_QUEUED}", "--format=%j"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        limit = sum(1 for job in names if not job.startswith(f"{name}-")) + room
        modify(limit)
        return limit

    yield set_room
    modify(-1)


# Stands in for the trainer: the run completes at once (adapter and metrics on storage).
FAKE_TRAINER = """#!/bin/sh
mkdir -p adapter && echo '{}' > adapter/adapter_config.json && echo '{"train_loss": 1.0}' > metrics.json
"""


def _limited_grid(tmp_path, prefix: str, max_submit_jobs, cancel_after):
    """Six held runs whose trainer completes at once, and a user limit leaving room for four."""
    name = unique_name(prefix)
    trainer = tmp_path / "fake-python"
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    p = plan(
        write_experiment(
            tmp_path, name, slurm=HELD, environment={"python": str(trainer)}, grid={"train.seed": [1, 2, 3, 4, 5, 6]}
        )
    )
    cancel_after(p)
    limit = max_submit_jobs(name, 4)
    return p, limit


def _release_and_complete(backend, p, run_ids):
    """These runs end (released, they complete at once): room frees."""
    for run_id in run_ids:
        subprocess.run(["scontrol", "release", _submission_ids(p, run_id)[0]], check=True)
    wait_for(
        lambda: all(backend.status(p)[run_id].state == State.COMPLETED for run_id in run_ids),
        timeout=120,
        message="the released runs to complete",
    )


def test_a_grid_over_the_users_limit_queues_what_fits_and_a_later_submit_the_rest(
    max_submit_jobs, tmp_path, cancel_after
):
    p, limit = _limited_grid(tmp_path, "lim", max_submit_jobs, cancel_after)
    backend = SlurmBackend()

    def release_and_complete(run_ids):
        _release_and_complete(backend, p, run_ids)

    first = backend.submit(p)
    queued = [run.run_id for run in p.runs[:4]]
    # In plan order, as far as the room goes; training only: the grid's one evaluation job
    # goes out with the last runs.
    assert first.submitted == {run_id: [_submission_ids(p, run_id)[0]] for run_id in queued}
    assert {first.skipped[run.run_id] for run in p.runs[4:]} == {WAITING}
    (note,) = first.notes
    assert note.startswith(f"4 of 6 runs queued; 2 wait for room (your association's MaxSubmitJobs={limit}, ")
    assert "`qlaunch submit` again" in note and "evaluation job goes out with the last of them" in note
    assert "`qlaunch status --watch --top-up`" in note
    # The limit is Slurm's own: one more job of this user is refused by slurmctld itself.
    refused = subprocess.run(["sbatch", "--hold", "--output=/dev/null", "--wrap=true"], capture_output=True, text=True)
    assert refused.returncode != 0 and "AssocMaxSubmitJobLimit" in refused.stderr, refused.stderr

    second = backend.submit(p)  # no room freed: nothing new, nothing twice
    assert second.submitted == {} and second.notes[0].startswith("0 of 2 runs queued; 2 wait for room")

    release_and_complete(queued[:2])
    third = backend.submit(p)
    assert sorted(third.submitted) == sorted(run.run_id for run in p.runs[4:])
    assert third.notes == [f"the grid's evaluation job waits for room ({third.notes[0].split('(', 1)[1]}"]

    release_and_complete(queued[2:3])
    fourth = backend.submit(p)
    evaluation = {jobs[0] for jobs in fourth.submitted.values()}
    assert len(fourth.submitted) == 6 and len(evaluation) == 1 and fourth.notes == []
    arrays = {_submission_ids(p, run.run_id)[0].split("_")[0] for run in p.runs}
    assert len(arrays) == 2  # every run once: the first four in one array, the last two in another
    shown = _scontrol(evaluation.pop())["Dependency"]
    assert all(f"afterany:{array}_*" in shown for array in arrays)


def test_status_watch_top_up_queues_the_waiting_runs_as_room_frees_and_never_twice(
    max_submit_jobs, tmp_path, cancel_after
):
    p, limit = _limited_grid(tmp_path, "topup", max_submit_jobs, cancel_after)
    backend = SlurmBackend()
    first = backend.submit(p)
    queued, waiting = [run.run_id for run in p.runs[:4]], [run.run_id for run in p.runs[4:]]
    assert sorted(first.submitted) == sorted(queued)

    output = tmp_path / "watch.out"
    with open(output, "w") as out:
        watch = subprocess.Popen(
            [PYTHON, "-m", "launcher.cli", "status", str(p.source), "--watch", "--top-up", "--interval", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:

        def said() -> list[str]:
            return [line for line in output.read_text().splitlines() if line.startswith("top-up:")]

        # A refresh with no room queues nothing and says nothing; the table keeps coming.
        def tables() -> int:  # one title line per refresh: "<experiment> · slurm · 6 runs · <time>"
            return sum(1 for line in output.read_text().splitlines() if p.experiment.name in line and "6 runs" in line)

        wait_for(lambda: tables() >= 2, timeout=60, message="two refreshes")
        assert said() == [] and all(not RunPaths.of(run).submission.exists() for run in p.runs[4:])

        _release_and_complete(backend, p, queued[:2])  # room for two
        wait_for(lambda: said(), timeout=60, message="the watch's top-up line")
        jobs = {run_id: _submission_ids(p, run_id) for run_id in waiting}
        assert all(len(ids) == 1 for ids in jobs.values())  # one array for both, by the watch
        assert len({ids[0].split("_")[0] for ids in jobs.values()}) == 1
        shown = ", ".join(sorted(waiting))
        # The evaluation job still waits: the queue is full again (2 held + 2 new of 4).
        assert said() == [f"top-up: queued 2 jobs for 2 runs ({shown}); the rest still waits for room"]

        # Later refreshes queue nothing twice; once the runs end, the grid's evaluation job goes out.
        _release_and_complete(backend, p, queued[2:] + waiting)
        wait_for(lambda: len(said()) == 2, timeout=60, message="the evaluation job, queued by the watch")
        assert said()[1].startswith("top-up: queued 1 job for 6 runs (") and said()[1].endswith(
            "nothing waits for room now"
        )
        time.sleep(3)  # three more refreshes: nothing more is queued
        assert len(said()) == 2
        assert all(len(_submission_ids(p, run.run_id)) == 2 for run in p.runs)  # training + evaluation
        assert watch.poll() is None  # the evaluation job is held: still active, still watched
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=30)


def test_two_submits_of_one_grid_at_once_queue_each_run_once(cluster, tmp_path, cancel_after):
    p = plan(
        write_experiment(
            tmp_path, unique_name("twice"), slurm=HELD, inference={"enabled": False}, grid={"train.seed": [1, 2, 3, 4]}
        )
    )
    cancel_after(p)
    command = [PYTHON, "-m", "launcher.cli", "submit", str(p.source), "--skip-preflight", "--no-prefetch"]
    both = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in both]
    assert [proc.returncode for proc in both] == [0, 0], outputs
    # One queued the grid; the other, after it, found every run queued and submitted nothing.
    assert sorted(output.count(" submitted: ") for output in outputs) == [0, 4], outputs
    assert sorted(output.count(" skipped: already pending") for output in outputs) == [0, 4], outputs
    assert all(len(_submission_ids(p, run.run_id)) == 1 for run in p.runs)


def _submission_ids(p, run_id: str) -> list[str]:
    run = next(run for run in p.runs if run.run_id == run_id)
    return [job["job_id"] for job in json.loads(RunPaths.of(run).submission.read_text())["jobs"]]
