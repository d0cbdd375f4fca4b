"""The requeue guard on the real test cluster (slurm/cluster.sh up): a training job that keeps
exiting 75 ("checkpointed, requeue me") is requeued by its batch script only up to
resources.max_requeues, and not after resources.max_requeues_without_progress requeues in a row
without a newer checkpoint (launcher/job/requeue.py).

The job's command is a stand-in trainer (environment.python is a shell script): it exits 75 at
once, saving a new checkpoint folder first when told to, so each attempt takes a second and the
test measures the guard, not training. A requeued job waits cred_expire + 1 s (11 s on the test
cluster) before it runs again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from slurm_support import (
    cancel_after,  # noqa: F401 - fixture
    plan,
    require_cluster,
    scheduler_jobs,
    unique_name,
    wait_for,
    write_experiment,
)

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.requeue import EXIT_REQUEUES_EXHAUSTED, LOG_NAME
from launcher.job.storage import RunPaths

pytestmark = [pytest.mark.slurm]

# Stands in for `python -m training.launch run.yaml`: what a trainer that checkpointed on a
# signal and stopped does, in a second. ADVANCE=1: a newer checkpoint each attempt.
FAKE_TRAINER = """#!/bin/sh
echo "fake trainer: attempt ${SLURM_RESTART_COUNT:-0}"
if [ "$ADVANCE" = 1 ]; then mkdir -p "checkpoints/checkpoint-$(( ${SLURM_RESTART_COUNT:-0} * 10 + 10 ))"; fi
exit 75
"""


@pytest.fixture
def cluster():
    require_cluster()


def _experiment(folder: Path, name: str, advance: bool, **resources):
    folder.mkdir()
    trainer = folder / "fake-python"
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    return plan(
        write_experiment(
            folder,
            name,
            environment={"python": str(trainer), "variables": {"ADVANCE": "1" if advance else "0"}},
            resources={"time_limit": "00:05:00", **resources},
            inference={"enabled": False},
        )
    )


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_exit_75_is_requeued_up_to_the_cap_and_not_without_progress(cluster, tmp_path, cancel_after):
    # One job advances a checkpoint every attempt and meets the cap (2 requeues: 3 attempts);
    # the other never saves one and stops after 1 requeue without progress (2 attempts).
    capped = _experiment(
        tmp_path / "capped", unique_name("rqcap"), advance=True, max_requeues=2, max_requeues_without_progress=5
    )
    stalled = _experiment(
        tmp_path / "stalled", unique_name("rqstall"), advance=False, max_requeues=10, max_requeues_without_progress=1
    )
    backend = SlurmBackend()
    jobs = {}
    for p in (capped, stalled):
        cancel_after(p)
        (run,) = p.runs
        (jobs[p.experiment.name],) = backend.submit(p).submitted[run.run_id]  # the two share a run id

    def ended(p):
        (run,) = p.runs
        return backend.status(p)[run.run_id].state not in (State.PENDING, State.RUNNING, State.REQUEUED)

    wait_for(
        lambda: ended(capped) and ended(stalled), timeout=240, message="both jobs to stop being requeued", interval=2
    )

    for p, attempts, words in (
        (capped, 3, "requeued 2 times already (resources.max_requeues: 2)"),
        (stalled, 2, "2 attempts in a row stopped without saving a newer checkpoint"),
    ):
        (run,) = p.runs
        paths, job_id = RunPaths.of(run), jobs[p.experiment.name]
        # Slurm itself: the job ended with the guard's exit code after exactly that many restarts.
        assert scheduler_jobs(job_id).get(job_id) == "FAILED"
        fields = _scontrol(job_id)
        assert fields["Restarts"] == str(attempts - 1)
        assert fields["ExitCode"] == f"{EXIT_REQUEUES_EXHAUSTED}:0"
        stops = (paths.root / LOG_NAME).read_text().splitlines()
        assert [line.split()[:2] for line in stops] == [[job_id, str(n)] for n in range(attempts)]
        log = paths.train_log.read_text()
        assert log.count("requeueing job") == attempts - 1
        assert words in log and "`qlaunch submit` resumes the run" in log
        # qlaunch status says why, not just "failed (exit 76)".
        status = backend.status(p)[run.run_id]
        assert status.state == State.FAILED and words in status.detail

    (stalled_run,) = stalled.runs
    assert [line.split()[2:] for line in (RunPaths.of(stalled_run).root / LOG_NAME).read_text().splitlines()] == [
        ["none", "0"],
        ["none", "0"],
    ]
