"""Shared by the tests/test_slurm_*.py modules (no tests of its own).

The cluster tests run against the real single-node cluster of `slurm/cluster.sh up`. Without
`sbatch` they are skipped on a developer's machine and fail under CI (CI=true), where a
missing cluster means the CI setup is broken, not that the tests do not apply.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from training_support import wait_until

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.grid import Plan, plan

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def require_cluster() -> None:
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch not found"
    else:
        result = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True)
        if result.returncode != 0:
            problem = f"sinfo failed: {result.stderr.strip()}"
    if problem:
        message = f"{problem}: start the test cluster first (bash slurm/cluster.sh up)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_experiment(folder: Path, name: str, **sections) -> Path:
    """An experiment for the test cluster: CPU-only jobs of 1 CPU so two fit the 2-core node."""
    data = {
        "name": name,
        "backend": "slurm",
        "storage": {"root": str(folder / "runs")},
        "environment": {"python": PYTHON},
        "resources": {"gpus_per_node": 0, "cpus_per_task": 1, "memory": "1G", "time_limit": "00:20:00"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scheduler_jobs(*job_ids: str) -> dict[str, str]:
    """job id → Slurm state, straight from squeue (independent of the backend's parsing); array
    tasks (`123_4`) one per line, asked for by their array."""
    if not job_ids:
        return {}
    asked = ",".join(dict.fromkeys(job_id.split("_")[0] for job_id in job_ids))
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", f"--jobs={asked}", "--format=%i %T"],
        capture_output=True,
        text=True,
    ).stdout
    listed = dict(line.split() for line in out.splitlines() if line.strip())
    return {job_id: state for job_id, state in listed.items() if job_id in job_ids}


def wait_for(predicate, timeout: float, message: str, interval: float = 1.0):
    """Polls the scheduler once a second (the training helpers poll files much faster)."""
    return wait_until(predicate, timeout, message, interval)


@pytest.fixture
def cancel_after():
    """Plans registered here have all their jobs cancelled when the test ends, pass or fail."""
    plans: list[Plan] = []
    yield plans.append
    backend = SlurmBackend()
    for p in plans:
        try:
            backend.cancel(p, list(p.runs))
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def states(backend: SlurmBackend, p: Plan) -> dict[str, State]:
    return {run_id: status.state for run_id, status in backend.status(p).items()}


__all__ = [
    "REPO",
    "PYTHON",
    "cancel_after",
    "plan",
    "require_cluster",
    "scheduler_jobs",
    "states",
    "unique_name",
    "wait_for",
    "write_experiment",
]
