"""Successive halving on the real test cluster (issue #30): a run that asha stops ends its Slurm
job with exit 0, so the slot it held goes to the next run of the grid at once, and status says
where it was stopped.

One slot: each job asks for both CPUs of the `normal` node, so the grid's runs go one after the
other. The rung ledger is seeded with three better results, so every run of this grid is stopped
at its first rung whatever the order Slurm starts them in.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from slurm_support import PYTHON, cancel_after, plan, require_cluster, unique_name, wait_for  # noqa: F401

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.progress import read_events
from launcher.job.storage import RunPaths

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _job_times(job_id: str) -> tuple[str, str, str]:
    """(state, StartTime, EndTime) from `scontrol show job` (ended jobs stay listed for MinJobAge)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", text))
    return fields.get("JobState", "?"), fields.get("StartTime", "?"), fields.get("EndTime", "?")


def test_a_pruned_task_frees_its_slot_for_the_next_run(tmp_path, tiny_experiment, cancel_after):
    require_cluster()
    p = plan(
        tiny_experiment(
            tmp_path,
            name=unique_name("asha"),
            backend="slurm",
            environment={"python": PYTHON},
            resources={"gpus_per_node": 0, "cpus_per_task": 2, "memory": "2G", "time_limit": "00:10:00"},
            train={"max_steps": 27, "save_steps": 1000, "logging_steps": 1, "per_device_train_batch_size": 2},
            lora={"dropout": 0.0},
            dataset={"path": "data.jsonl", "test_size": 0.25},
            inference={"enabled": False},
            search={"strategy": "asha", "first_rung_steps": 1, "reduction_factor": 3},
            grid={"train.learning_rate": [1e-4, 1e-3]},
        )
    )
    cancel_after(p)
    rung0 = Path(p.runs[0].run_dir).parent / "asha" / "rung-0"
    rung0.mkdir(parents=True)
    for n in range(3):  # three runs of another submission already did better at rung 0
        (rung0 / f"earlier{n}.json").write_text(json.dumps({"value": 0.001 * n}))

    backend = SlurmBackend()
    report = backend.submit(p)
    jobs = {run_id: ids[0] for run_id, ids in report.submitted.items()}
    assert len(jobs) == 2

    def ended():
        statuses = backend.status(p)
        bad = {r: s for r, s in statuses.items() if s.state in (State.FAILED, State.CANCELLED, State.TIMEOUT)}
        assert not bad, {
            r: RunPaths.of(run).train_log.read_text()[-2000:]
            for run in p.runs
            for r in bad
            if run.run_id == r and RunPaths.of(run).train_log.exists()
        }
        return all(s.state == State.COMPLETED for s in statuses.values())

    wait_for(ended, timeout=600, message="both runs stopped by asha", interval=3)

    times = {run_id: _job_times(job) for run_id, job in jobs.items()}
    assert {state for state, _, _ in times.values()} == {"COMPLETED"}  # exit 0: a stop, not a failure
    first, second = sorted(times.values(), key=lambda t: t[1])
    assert second[1] >= first[2], f"the second run started before the first ended: {times}"
    for run in p.runs:
        ends = [e for e in read_events(RunPaths.of(run).progress) if e.get("event") == "end"]
        assert ends[-1]["status"] == "pruned"
        metrics = json.loads(RunPaths.of(run).metrics.read_text())
        assert metrics["pruned"]["rung"] == 0 and metrics["global_step"] < run.train.max_steps
    table = subprocess.run(
        [PYTHON, "-m", "launcher.cli", "status", str(p.source), "--wide"], capture_output=True, text=True, timeout=120
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("pruned @ rung 0") == 2, table.stdout
