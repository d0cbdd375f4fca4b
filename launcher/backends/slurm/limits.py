"""What the cluster lets this user queue, read before a grid is submitted (issue #28).

- `MaxArraySize` (`scontrol show config`): array indices stay below it; arrays.py cuts each
  group of runs into chunks of at most that many.
- `MaxJobCount`: the job records slurmctld keeps at once (finished ones too, for MinJobAge);
  a new array's tasks are counted one each, against the records held now.
- Where slurmdbd answers: the user's association `MaxSubmitJobs` and the QOS's
  `MaxSubmitJobsPerUser` (`sacctmgr show assoc` / `show qos`): the pending and running jobs
  (array tasks included) one user may have.

A grid that does not fit goes out as far as it fits, in plan order; the rest waits for a later
`qlaunch submit`, which counts again. Never a half-refused sbatch: an array either fits or is
not submitted.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...job.errors import BackendError
from .arrays import DEFAULT_MAX_ARRAY_SIZE
from .jobs import SlurmCommands

# A state in which a job counts against MaxSubmitJobs (queued or holding resources).
_QUEUED_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


@dataclass(frozen=True)
class Limits:
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    room: int | None = None  # jobs (array tasks) this user may still queue; None: no known limit
    why: str = ""  # the limit that sets room, in words
    notes: tuple[str, ...] = ()  # what could not be read

    def fit(self, costs: list[int]) -> int:
        """How many of these (in order) fit the room: each costs that many jobs."""
        if self.room is None:
            return len(costs)
        used = 0
        for n, cost in enumerate(costs):
            if used + cost > self.room:
                return n
            used += cost
        return len(costs)


def _answer(commands: SlurmCommands, args: list[str]) -> subprocess.CompletedProcess | None:
    """The command's result, or None where it is missing or does not answer (sbatch then says
    so itself, in its own words)."""
    try:
        return commands.run(args, check=False)
    except BackendError:
        return None


def _config(commands: SlurmCommands) -> dict[str, str]:
    result = _answer(commands, ["scontrol", "show", "config"])
    if result is None or result.returncode != 0:
        return {}
    pairs = (line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _number(value: str | None) -> int | None:
    value = (value or "").split()[0] if value and value.split() else ""
    return int(value) if value.isdigit() else None


def _sacctmgr_limits(commands: SlurmCommands, user: str, qos: str | None) -> tuple[list[tuple[int, str]], str | None]:
    """([(limit, what)], None) where slurmdbd answers; ([], why not) elsewhere."""
    # Both asked at once: each sacctmgr call is a round trip to slurmdbd (~0.2 s on the test cluster).
    with ThreadPoolExecutor(max_workers=2) as pool:
        asked = pool.submit(
            _answer,
            commands,
            [
                "sacctmgr",
                "--noheader",
                "--parsable2",
                "show",
                "assoc",
                f"user={user}",
                "format=MaxSubmit,QOS,DefaultQOS",
            ],
        )
        qos_asked = pool.submit(
            _answer,
            commands,
            ["sacctmgr", "--noheader", "--parsable2", "show", "qos", "format=Name,MaxSubmitJobsPerUser"],
        )
        assoc, qos_rows = asked.result(), qos_asked.result()
    if assoc is None:
        return [], "sacctmgr is not on PATH or did not answer"
    if assoc.returncode != 0:
        said = (assoc.stderr or assoc.stdout).strip().splitlines()
        return [], said[0] if said else f"sacctmgr exit status {assoc.returncode}"
    limits: list[tuple[int, str]] = []
    qos_names: set[str] = {qos} if qos else set()
    for line in assoc.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 3:
            value = _number(fields[0])
            if value is not None:
                limits.append((value, f"your association's MaxSubmitJobs={value}"))
            if not qos:
                qos_names.add(fields[2] or "normal")
    if qos_rows is not None and qos_rows.returncode == 0:
        for line in qos_rows.stdout.splitlines():
            name, _, value = line.partition("|")
            number = _number(value)
            if name in qos_names and number is not None:
                limits.append((number, f"QOS {name}'s MaxSubmitJobsPerUser={number}"))
    return limits, None


def read(commands: SlurmCommands, qos: str | None = None) -> Limits:
    """The cluster's limits for this user, with one scontrol, one squeue and two sacctmgr calls
    (at once; they answer where slurmdbd runs)."""
    config = _config(commands)
    notes = []
    max_array = _number(config.get("MaxArraySize"))
    if max_array is None:
        notes.append(
            f"MaxArraySize could not be read (scontrol show config); arrays are cut at Slurm's default {DEFAULT_MAX_ARRAY_SIZE}"
        )
        max_array = DEFAULT_MAX_ARRAY_SIZE
    user = os.environ.get("USER") or getpass.getuser()
    # One line per array task; %A is the task's own job record, or its array's while the task
    # is pending and not yet split off (one record for all of them).
    jobs = _answer(commands, ["squeue", "--noheader", "--array", "--states=all", "--format=%A|%u|%T"])
    answered = jobs is not None and jobs.returncode == 0
    rows = [line.split("|", 2) for line in jobs.stdout.splitlines() if line.count("|") == 2] if answered else []
    held = len({record for record, _, _ in rows})
    mine = sum(1 for _, owner, state in rows if owner.strip() == user and state.strip() in _QUEUED_STATES)
    candidates: list[tuple[int, str]] = []
    max_jobs = _number(config.get("MaxJobCount"))
    if max_jobs is not None and answered:
        # slurmctld refuses a job once its records reach MaxJobCount; keep one record spare.
        candidates.append((max(0, max_jobs - held - 1), f"MaxJobCount={max_jobs}, {held} jobs held by slurmctld"))
    user_limits, why_not = _sacctmgr_limits(commands, user, qos)
    if why_not is not None:
        notes.append(
            f"per-user limits (MaxSubmitJobs) could not be read (sacctmgr: {why_not}): a cluster without "
            "Slurm accounting (slurmdbd) has none; where one is set, sbatch refuses an array that goes over it"
        )
    for limit, what in user_limits:
        candidates.append((max(0, limit - mine), f"{what}, {mine} of your jobs queued"))
    room, why = min(candidates) if candidates else (None, "")
    return Limits(max_array_size=max_array, room=room, why=why, notes=tuple(notes))
