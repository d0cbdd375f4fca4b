"""Talking to Slurm through its own commands (sbatch, squeue, sacct, scancel, sinfo).

The commands are what users run on a login node and what every site has; each call here is
one process, and `squeue_jobs`/`sacct_jobs` take any number of job ids, so a status refresh
costs the same for 2 runs or 200. Their `|`-separated output is parsed by submitit's parser
for sacct's `--parsable2` format (it also expands job-array ids).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ...job.errors import BackendError
from ..base import State

NOT_FOUND_HINT = (
    "qlaunch's Slurm backend runs where the Slurm commands are, e.g. a cluster's login node "
    "(to try it on this machine: sudo slurm/cluster.sh up)"
)

# squeue -O field → the column name submitit's parser keys on.
_SQUEUE_FIELDS = (
    ("JobArrayID", "JobID"),  # `123_4` for an array task (JobID is the task's own number), else the id
    ("State", "State"),
    ("RestartCnt", "Restarts"),
    ("Reason", "Reason"),
    ("exit_code", "ExitCode"),
    ("NodeList", "NodeList"),
)
_SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList")

_STATES = {
    "PENDING": State.PENDING,
    "CONFIGURING": State.RUNNING,
    "RUNNING": State.RUNNING,
    "COMPLETING": State.RUNNING,
    "SIGNALING": State.RUNNING,
    "STAGE_OUT": State.RUNNING,
    "RESIZING": State.RUNNING,
    "SUSPENDED": State.PENDING,
    "STOPPED": State.PENDING,
    "REQUEUED": State.REQUEUED,
    "REQUEUE_HOLD": State.REQUEUED,
    "REQUEUE_FED": State.REQUEUED,
    "PREEMPTED": State.REQUEUED,
    "COMPLETED": State.COMPLETED,
    "FAILED": State.FAILED,
    "NODE_FAIL": State.FAILED,
    "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.FAILED,
    "SPECIAL_EXIT": State.FAILED,
    "CANCELLED": State.CANCELLED,
    "REVOKED": State.CANCELLED,
    "TIMEOUT": State.TIMEOUT,
    "OUT_OF_MEMORY": State.OUT_OF_MEMORY,
}


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    scheduler_state: str  # Slurm's own name, e.g. PENDING, RUNNING, COMPLETED
    restarts: int = 0
    reason: str = ""
    exit_code: str = ""
    nodes: str = ""

    @property
    def state(self) -> State:
        state = _STATES.get(self.scheduler_state, State.UNKNOWN)
        # A requeued job is PENDING again, with its restart count raised.
        if state == State.PENDING and self.restarts > 0:
            return State.REQUEUED
        return state

    @property
    def detail(self) -> str:
        state = self.state
        if state in (State.PENDING, State.REQUEUED):
            return self.reason if self.reason and self.reason != "None" else ""
        if state == State.RUNNING:
            return f"on {self.nodes}" if self.nodes else ""
        if state in (State.FAILED, State.OUT_OF_MEMORY, State.TIMEOUT) and self.exit_code:
            return f"exit {self.exit_code}"
        return ""


def _parse(text: str, header: Sequence[str]) -> dict[str, dict[str, str]]:
    from submitit.slurm.slurm import SlurmInfoWatcher  # ~0.15 s import: only when parsing

    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    return SlurmInfoWatcher().read_info("|".join(header) + "\n" + "\n".join(lines))


def _job_info(job_id: str, fields: Mapping[str, str]) -> JobInfo:
    restarts = fields.get("Restarts", "0")
    return JobInfo(
        job_id=job_id,
        # sacct says "CANCELLED by 0"
        scheduler_state=(fields.get("State") or "UNKNOWN").split()[0].rstrip("+"),
        restarts=int(restarts) if restarts.isdigit() else 0,
        reason=fields.get("Reason", ""),
        exit_code=fields.get("ExitCode", ""),
        nodes=fields.get("NodeList", ""),
    )


class SlurmCommands:
    """One object per backend; remembers whether this cluster has accounting (sacct)."""

    def __init__(self) -> None:
        self._accounting: bool | None = None

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        what: str | None = None,
        check: bool = True,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        program = args[0]
        if shutil.which(program, path=(env or os.environ).get("PATH")) is None:
            raise BackendError(f"{program} not found on PATH: {NOT_FOUND_HINT}")
        try:
            result = subprocess.run(
                list(args),
                capture_output=True,
                text=True,
                env=dict(env) if env else None,
                cwd=cwd,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"{program} did not answer within 120 s (is slurmctld up?)") from None
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
            raise BackendError(f"{what or program} failed: {message}")
        return result

    # ---- submission ---------------------------------------------------------------------------
    def sbatch(self, script: Path, options: Sequence[str] = (), *, env: Mapping[str, str], what: str) -> str:
        """Submit a script file as it is, from its own folder; returns the job id."""
        result = self.run(["sbatch", "--parsable", *options, str(script)], env=env, what=what, cwd=script.parent)
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise BackendError(f"{what}: sbatch answered {result.stdout.strip()!r} instead of a job id")
        return job_id

    def test_only(self, script: Path, *, env: Mapping[str, str], what: str) -> None:
        """Ask slurmctld whether it would accept the script (partition, resources, account); submits nothing."""
        result = self.run(["sbatch", "--test-only", str(script)], env=env, what=what, check=False)
        if result.returncode != 0:
            message = result.stderr.strip() or result.stdout.strip()
            if "invalid partition" in message.lower():
                message += f" (partitions on this cluster: {', '.join(self.partitions()) or 'none'})"
            raise BackendError(f"{what}: Slurm refuses it: {message}")

    def partitions(self) -> list[str]:
        result = self.run(["sinfo", "--noheader", "--format=%R"], check=False)
        return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})

    def scancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.run(["scancel", *job_ids], what="scancel")

    # ---- state ----------------------------------------------------------------------------------
    def squeue_jobs(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """Jobs slurmctld still knows (pending, running, and finished within MinJobAge): one call."""
        if not job_ids:
            return {}
        fields = ",".join(f"{name}:|" for name, _ in _SQUEUE_FIELDS)
        # Array tasks (`123_4`) are asked for by their array (`123`), and listed one per line (--array).
        jobs = ",".join(dict.fromkeys(job_id.split("_")[0] for job_id in job_ids))
        result = self.run(
            ["squeue", "--noheader", "--array", "--states=all", f"--jobs={jobs}", f"--Format={fields}"],
            check=False,
        )
        if result.returncode != 0:
            # Asked for a single job slurmctld has forgotten: squeue calls that an error.
            if "invalid job id" in result.stderr.lower():
                return {}
            raise BackendError(f"squeue failed: {result.stderr.strip() or result.returncode}")
        rows = [line.rstrip().rstrip("|") for line in result.stdout.splitlines()]
        parsed = _parse("\n".join(rows), [column for _, column in _SQUEUE_FIELDS])
        wanted = set(job_ids)
        return {job_id: _job_info(job_id, fields) for job_id, fields in parsed.items() if job_id in wanted}

    def accounting_enabled(self) -> bool:
        if self._accounting is None:
            result = self.run(["scontrol", "show", "config"], check=False)
            self._accounting = result.returncode == 0 and not any(
                line.split("=", 1)[-1].strip() == "accounting_storage/none"
                for line in result.stdout.splitlines()
                if line.startswith("AccountingStorageType")
            )
        return self._accounting

    def sacct_jobs(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """Finished jobs from the accounting database: one call (only where slurmdbd runs)."""
        if not job_ids or not self.accounting_enabled():
            return {}
        result = self.run(
            [
                "sacct",
                "--allocations",
                "--parsable2",
                "--noheader",
                f"--format={','.join(_SACCT_FIELDS)}",
                f"--jobs={','.join(job_ids)}",
            ],
            check=False,
        )
        if result.returncode != 0:
            return {}
        parsed = _parse(result.stdout, _SACCT_FIELDS)
        return {job_id: _job_info(job_id, fields) for job_id, fields in parsed.items() if job_id in job_ids}
