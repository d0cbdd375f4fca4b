"""The requeue guard: when a training job that checkpointed and stopped (exit 75) is started again.

Exit 75 means "resume me": the trainer saved a checkpoint on a signal (Slurm's USR1 before the
time limit, a preemption's TERM, a pod's eviction). Requeueing it is right as long as each attempt
gets further. It is a loop that burns GPU hours when it does not: a time limit shorter than
loading the model plus one checkpoint, a node that signals every job, a trainer that checkpoints
and stops at once. So a job is requeued

  - at most `resources.max_requeues` times (every restart of the job counts), and
  - not after `resources.max_requeues_without_progress` requeues in a row whose attempt saved no
    newer checkpoint than the one it started from (a stalled attempt).

Each stop is one line of `<run dir>/requeues.log`: `<job> <restart> <newest checkpoint step or
none> <1 if the attempt advanced it, else 0>`, appended by whoever decides. On Slurm that is the
batch script (slurm/train.sbatch.j2: it runs on the host, where `scontrol requeue` is, and also
when the job's command is not training.launch); on Kubernetes it is training.launch in the
training pod (rank 0), which exits EXIT_REQUEUES_EXHAUSTED instead of 75, and the Job's
podFailurePolicy fails the Job on that code instead of replacing the pod. Either way the reason
goes to the log and to `<run dir>/requeue-stopped.txt`, which `qlaunch status` shows.

Pure Python, no torch: training.launch imports it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Exit code of a training job that checkpointed and stopped but will not be requeued.
EXIT_REQUEUES_EXHAUSTED = 76
LOG_NAME = "requeues.log"
STOPPED_NAME = "requeue-stopped.txt"
# Set in a Kubernetes training pod (the Job's uid, through the downward API): the pod decides.
JOB_ENV = "QLAUNCH_REQUEUE_JOB"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class Stop:
    job: str
    restart: int
    newest: int | None
    advanced: bool

    def line(self) -> str:
        newest = "none" if self.newest is None else str(self.newest)
        return f"{self.job} {self.restart} {newest} {int(self.advanced)}\n"


def newest_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (partial saves are `.tmp-*`, never matched)."""
    try:
        steps = [
            int(m.group(1))
            for p in (run_dir / "checkpoints").iterdir()
            if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()
        ]
    except OSError:
        return None
    return max(steps, default=None)


def read_stops(run_dir: Path, job: str) -> list[Stop]:
    """The recorded stops of one job, oldest first (lines of other jobs and torn lines skipped)."""
    try:
        lines = (run_dir / LOG_NAME).read_text().splitlines()
    except OSError:
        return []
    stops = []
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or parts[0] != job or not parts[1].isdigit() or parts[3] not in ("0", "1"):
            continue
        newest = None if parts[2] == "none" else int(parts[2]) if parts[2].isdigit() else None
        stops.append(Stop(job, int(parts[1]), newest, parts[3] == "1"))
    return stops


def stalled(stops: list[Stop]) -> int:
    """How many of the newest stops in a row saved no newer checkpoint."""
    count = 0
    for stop in reversed(stops):
        if stop.advanced:
            break
        count += 1
    return count


def cap_message(restarts: object, max_requeues: int) -> str:
    # `restarts` is a number, or the shell variable the batch script renders in its place.
    return f"not requeued: the job was requeued {restarts} times already (resources.max_requeues: {max_requeues})"


def stall_message(stalled_stops: object, max_without_progress: int) -> str:
    return (
        f"not requeued: {stalled_stops} attempts in a row stopped without saving a newer checkpoint "
        f"(resources.max_requeues_without_progress: {max_without_progress}); a time limit shorter "
        "than loading the model plus one checkpoint does this"
    )


def refusal(restarts: int, stalled_stops: int, max_requeues: int, max_without_progress: int) -> str | None:
    """Why the job must not be requeued after this stop, or None (requeue it). `restarts`: how
    often the job was started again already; `stalled_stops`: this stop included."""
    if restarts >= max_requeues:
        return cap_message(restarts, max_requeues)
    if stalled_stops > max_without_progress:
        return stall_message(stalled_stops, max_without_progress)
    return None


def decide(
    run_dir: Path, job: str, started_from: int | None, max_requeues: int, max_without_progress: int
) -> str | None:
    """Record this stop of `job` and say why it must not be requeued (None: requeue it).
    Used by training.launch in a Kubernetes pod; the Slurm batch script does the same in bash."""
    previous = read_stops(run_dir, job)
    newest = newest_checkpoint(run_dir)
    advanced = newest is not None and (started_from is None or newest > started_from)
    stop = Stop(job, len(previous), newest, advanced)
    with open(run_dir / LOG_NAME, "a") as handle:
        handle.write(stop.line())
    reason = refusal(stop.restart, stalled([*previous, stop]), max_requeues, max_without_progress)
    if reason:
        (run_dir / STOPPED_NAME).write_text(f"{job} {reason}\n")
    return reason


def stopped_reason(run_dir: Path, job: str | None) -> str | None:
    """The guard's reason for not requeueing `job`, when it was the guard that stopped it."""
    try:
        recorded, _, reason = (run_dir / STOPPED_NAME).read_text().strip().partition(" ")
    except OSError:
        return None
    return reason if job is not None and recorded == job else None
