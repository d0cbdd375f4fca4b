"""A grid on Slurm as job arrays (issue #28): one `sbatch --array` per chunk of runs, not one
sbatch per run.

The runs that share their directives (partition, resources, account, QOS, throttle…) form a
group; a group is cut into chunks of at most MaxArraySize runs, because Slurm caps the task
*index* (`--array=1001-2000` is refused as well). Task N of a chunk is the run on line N of the
chunk's task list (`<storage root>/<experiment>/arrays/<chunk>.tasks`), and the array script
only looks its run up there and runs that run's own `train.sbatch` / `infer.sbatch`: one run per
task keeps its requeue guard, checkpoint, logs and multi-node step. Each chunk's files are named
after a hash of their content, so a file a queued task will read is never rewritten: a grid cut
differently later (another MaxArraySize) gets new files beside the old ones.

Slurm writes a task's output to `<chunk>.<kind>.logs/<task>.log`, a link to the run's own log,
so Slurm's own lines (preemption, cancellation) land in `train.log` as they did per job.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ... import templates
from ...job.config import RunConfig
from ...job.storage import RunPaths
from .jobs import JobInfo, SlurmCommands
from .script import INFER_SCRIPT, TRAIN_SCRIPT, RunScripts, directive

FOLDER = "arrays"
# Slurm's default MaxArraySize (indices 0..1000): what `render` cuts by, asking no cluster.
DEFAULT_MAX_ARRAY_SIZE = 1001


@dataclass(frozen=True)
class Chunk:
    """Runs that go out as one array: task i is runs[i]."""

    chunk_id: str
    folder: Path
    runs: tuple[RunConfig, ...]
    tasks: str  # the task list's text
    train: str  # the training array script
    infer: str | None  # the inference array script (None: no per-run inference)
    throttle: int | None

    @property
    def tasks_file(self) -> Path:
        return self.folder / f"{self.chunk_id}.tasks"

    def script(self, kind: str) -> Path:
        return self.folder / f"{self.chunk_id}.{kind}.sbatch"

    def logs(self, kind: str) -> Path:
        return self.folder / f"{self.chunk_id}.{kind}.logs"

    def index(self, run_id: str) -> int:
        return next(i for i, run in enumerate(self.runs) if run.run_id == run_id)

    def files(self) -> dict[str, str]:
        """File name → text, as `render` writes them and `submit` puts them in `folder`."""
        files = {self.tasks_file.name: self.tasks, self.script("train").name: self.train}
        if self.infer is not None:
            files[self.script("infer").name] = self.infer
        return files


def folder(runs: Sequence[RunConfig]) -> Path:
    """<storage root>/<experiment>/arrays (every run of a grid shares the parent)."""
    return Path(runs[0].run_dir).parent / FOLDER


def task_range(indices: Iterable[int]) -> str:
    """Slurm's index list: `0-99`, `3,17,20-25`."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = None
    for i in [*ordered, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def array_option(indices: Iterable[int], throttle: int | None) -> str:
    return f"--array={task_range(indices)}" + (f"%{throttle}" if throttle else "")


def _array_script(
    kind: str,
    run: RunConfig,
    count: int,
    scheduling: tuple[str, ...],
    tasks: Path,
    logs: Path,
    script: str,
    throttle: int | None,
) -> str:
    directives = [
        f"--job-name={run.name}-{'train' if kind == 'training' else 'infer'}",
        array_option(range(count), throttle),
        *scheduling,
        f"--output={logs}/%a.log",
    ]
    return templates.render(
        "slurm",
        "array.sbatch.j2",
        kind=kind,
        experiment=run.name,
        count=count,
        directives=[directive(d) for d in directives],
        tasks=str(tasks),
        script=script,
        throttle=throttle,
    )


def layout(
    runs: Sequence[RunConfig],
    scripts: Mapping[str, RunScripts],
    max_array_size: int,
    per_run_infer: Callable[[RunConfig], bool],
) -> list[Chunk]:
    """Every run of the plan in a chunk, in plan order: the same plan and MaxArraySize always
    give the same chunks (and file names), so a resubmit reuses the task lists."""
    if not runs:
        return []
    groups: dict[tuple, list[RunConfig]] = {}
    for run in runs:
        rendered = scripts[run.run_id]
        infer = rendered.infer_scheduling if per_run_infer(run) and rendered.infer is not None else None
        groups.setdefault((rendered.train_scheduling, infer, run.slurm.array_parallelism), []).append(run)
    place = folder(runs)
    chunks = []
    for (train_scheduling, infer_scheduling, throttle), members in groups.items():
        for start in range(0, len(members), max_array_size):
            part = tuple(members[start : start + max_array_size])
            tasks = "# task\trun\trun folder (qlaunch: array task N runs the run on the line starting with N)\n"
            tasks += "".join(f"{i}\t{run.run_id}\t{run.run_dir}\n" for i, run in enumerate(part))
            key = repr((train_scheduling, infer_scheduling, throttle)) + tasks
            chunk_id = f"{part[0].name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            tasks_file = place / f"{chunk_id}.tasks"
            train = _array_script(
                "training",
                part[0],
                len(part),
                train_scheduling,
                tasks_file,
                place / f"{chunk_id}.train.logs",
                TRAIN_SCRIPT,
                throttle,
            )
            infer = None
            if infer_scheduling is not None:
                infer = _array_script(
                    "inference",
                    part[0],
                    len(part),
                    infer_scheduling,
                    tasks_file,
                    place / f"{chunk_id}.infer.logs",
                    INFER_SCRIPT,
                    throttle,
                )
            chunks.append(Chunk(chunk_id, place, part, tasks, train, infer, throttle))
    return chunks


def write(chunk: Chunk) -> None:
    """The chunk's task list, scripts and log links (run folder logs), before its first sbatch."""
    chunk.folder.mkdir(parents=True, exist_ok=True)
    for name, text in chunk.files().items():
        path = chunk.folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    kinds = [("train", "train_log")] + ([("infer", "infer_log")] if chunk.infer is not None else [])
    for kind, log in kinds:
        logs = chunk.logs(kind)
        logs.mkdir(exist_ok=True)
        for i, run in enumerate(chunk.runs):
            link, target = logs / f"{i}.log", getattr(RunPaths.of(run), log)
            if not link.is_symlink() or os.readlink(link) != str(target):
                # Replaced in one rename, never removed first: a task of this chunk that starts
                # (or is requeued) meanwhile must not find no link and create a plain file,
                # which would keep its lines out of the run's log.
                spare = logs / f".{i}.log.{os.getpid()}"
                spare.unlink(missing_ok=True)
                spare.symlink_to(target)
                os.replace(spare, link)


def task_id(job_id: str) -> tuple[str, int] | None:
    """`123_4` → ("123", 4); a plain job id → None."""
    array, _, task = job_id.partition("_")
    return (array, int(task)) if task.isdigit() else None


def collapse(ids: Sequence[str], infos: Mapping[str, JobInfo]) -> list[str]:
    """scancel arguments: an array's id instead of its tasks when every active task of it is
    being cancelled (one request instead of one per task)."""
    by_array: dict[str, set[str]] = {}
    for job_id, info in infos.items():
        parsed = task_id(job_id)
        if parsed and info.state.active:
            by_array.setdefault(parsed[0], set()).add(job_id)
    chosen = set(ids)
    whole = {array for array, tasks in by_array.items() if tasks <= chosen}
    out = []
    for job_id in ids:
        parsed = task_id(job_id)
        name = parsed[0] if parsed and parsed[0] in whole else job_id
        if name not in out:
            out.append(name)
    return out


def throttle(commands: SlurmCommands, array_ids: Sequence[str], limit: int) -> None:
    """`scontrol update JobId=<array> ArrayTaskThrottle=K` on each array (0: no throttle)."""
    for array in array_ids:
        commands.run(
            ["scontrol", "update", f"JobId={array}", f"ArrayTaskThrottle={limit}"],
            what=f"scontrol update of array {array}",
        )


def submit_array(
    commands: SlurmCommands,
    chunk: Chunk,
    kind: str,
    indices: Sequence[int],
    env: Mapping[str, str],
    after: str | None = None,
) -> str:
    """One sbatch: the chunk's training or inference array over these task indices; returns the
    array's job id. after: the training array the inference tasks wait for, task by task."""
    options = [array_option(indices, chunk.throttle)]
    if after:
        options.append(f"--dependency=aftercorr:{after}")
    runs = ", ".join(chunk.runs[i].run_id for i in sorted(indices)[:3]) + (", …" if len(indices) > 3 else "")
    what = f"sbatch of the {kind} array of runs {runs} ({len(indices)} runs)"
    return commands.sbatch(chunk.script(kind), options, env=env, what=what)


def submit_actions(
    commands: SlurmCommands,
    chunks: Sequence[Chunk],
    actions: Sequence,
    env: Mapping[str, str],
    record: Callable[..., None],
    submitted: dict[str, list[str]],
    done: list[str],
) -> list:
    """Submit the actions (slurm._Action: run, train, infer, grid, after) as arrays, chunk by
    chunk: the training array over the runs to train, then the inference array over the runs
    with per-run inference (`aftercorr` on that training array, task by task; none where
    training is done). `record(run, kind, job_id, **fields)` writes submission.json;
    `submitted` gets each job id as it is submitted, `done` each run once all its jobs are. Returns the actions left for one job each: an
    inference job after a training job of another array layout (older submissions)."""
    chunk_of = {run.run_id: chunk for chunk in chunks for run in chunk.runs}
    singles = []
    by_chunk: dict[str, list] = {}
    for action in actions:
        chunk = chunk_of[action.run.run_id]
        if not action.train and action.infer and not action.grid and action.after:
            parsed = task_id(action.after)  # aftercorr pairs equal task ids only
            if parsed is None or parsed[1] != chunk.index(action.run.run_id):
                singles.append(action)
                continue
        if action.train or (action.infer and not action.grid):
            by_chunk.setdefault(chunk.chunk_id, []).append(action)
    for chunk in chunks:
        todo = by_chunk.get(chunk.chunk_id)
        if not todo:
            continue
        write(chunk)
        index = {action.run.run_id: chunk.index(action.run.run_id) for action in todo}
        train = [a for a in todo if a.train]
        infer_groups: dict[str | None, list] = {}

        def recorded(kind: str, array: str, actions: list, **fields) -> None:
            """Each action's task of the array, in its submission.json and in `submitted`."""
            for action in actions:
                i = index[action.run.run_id]
                record(
                    action.run,
                    kind,
                    f"{array}_{i}",
                    script=str(chunk.script(kind)),
                    array_job_id=array,
                    array_task_id=i,
                    **fields,
                )
                submitted.setdefault(action.run.run_id, []).append(f"{array}_{i}")

        if train:
            array = submit_array(commands, chunk, "train", [index[a.run.run_id] for a in train], env)
            recorded("train", array, train)
            for action in train:
                if action.infer and not action.grid:
                    infer_groups.setdefault(array, []).append(action)
        for action in todo:
            if not action.train and action.infer and not action.grid:
                after = task_id(action.after)[0] if action.after else None
                infer_groups.setdefault(after, []).append(action)
        for after, group in infer_groups.items():
            array = submit_array(commands, chunk, "infer", [index[a.run.run_id] for a in group], env, after=after)
            recorded("infer", array, group, dependency=f"--dependency=aftercorr:{after}" if after else None)
        done += [a.run.run_id for a in todo]
    return singles
