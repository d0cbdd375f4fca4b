"""Slurm batch scripts for one run: the run's job specs (launcher.jobspec) as sbatch files.

The directives are built as data and kept beside the text (`RunScripts.*_scheduling`), so
nothing reads them back out of a script (TorchX's `SlurmBatchRequest.materialize()`). Pure: the same run gives the same bytes (no clock, no environment, no cluster). Values that
reach the shell go through the templates' `|q`; values in `#SBATCH` lines go through
`directive()`, because sbatch reads those lines itself with its own quoting rules (double
quotes and backslash escapes; single quotes are literal), not through a shell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ... import templates
from ...job import requeue
from ...job.config import RunConfig
from ...job.errors import ConfigError
from ...job.hub import offline_env
from ...job.progress import EXIT_PREEMPTED
from ...jobspec import JobSpec, job_specs

TRAIN_SCRIPT = "train.sbatch"
INFER_SCRIPT = "infer.sbatch"

_SAFE_DIRECTIVE = re.compile(r"[\w@%+=:,./-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RunScripts:
    run_id: str
    train: str
    infer: str | None  # None when inference.enabled is false
    # The directives that decide whether Slurm accepts a job (not its name or log file): what
    # `sbatch --test-only` is asked about once per distinct set.
    train_scheduling: tuple[str, ...] = ()
    infer_scheduling: tuple[str, ...] = ()


def directive(text: str) -> str:
    """One `#SBATCH` argument, quoted the way sbatch's own directive parser reads it."""
    if _SAFE_DIRECTIVE.fullmatch(text):
        return text
    escaped = re.sub(r'(["\\#])', r"\\\1", text)
    return f'"{escaped}"'


def job_name(run: RunConfig, infer: bool = False) -> str:
    return f"{run.name}-{run.run_id}" + ("-infer" if infer else "")


def _check_path(value: str, what: str) -> None:
    # sbatch expands %j, %x, ... in --output; a newline would end the directive line.
    if "%" in value or "\n" in value:
        raise ConfigError(f"{what}: {value!r} contains '%' or a newline, which sbatch cannot take in a path")


def _validate(run: RunConfig) -> None:
    env = run.environment
    for index, line in enumerate(env.setup):
        if "\n" in line:
            raise ConfigError(f"environment.setup[{index}]: one shell line per list item (found a newline)")
    for name in env.variables:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"environment.variables.{name}: not a valid shell variable name")
    for index, extra in enumerate(run.slurm.extra_directives):
        if not extra.startswith("-") or "\n" in extra:
            raise ConfigError(
                f"slurm.extra_directives[{index}]: {extra!r} should be one sbatch option, e.g. --exclusive"
            )
    for key in ("partition", "inference_partition", "account", "qos", "constraint"):
        value = getattr(run.slurm, key)
        if value is not None and (not value or "\n" in value):
            raise ConfigError(f"slurm.{key}: {value!r} is not a valid value")
    if not re.fullmatch(r"[\w.+-]+", run.resources.gpu_type):
        raise ConfigError(f"resources.gpu_type: {run.resources.gpu_type!r} is not a GRES type name")
    _check_path(run.run_dir, "storage.root")


def _common_directives(run: RunConfig, partition: str | None) -> list[str]:
    slurm = run.slurm
    directives = []
    for key, value in (
        ("partition", partition),
        ("account", slurm.account),
        ("qos", slurm.qos),
        ("constraint", slurm.constraint),
    ):
        if value:
            directives.append(f"--{key}={value}")
    return directives


def _scheduling(directives: list[str]) -> tuple[str, ...]:
    return tuple(d for d in directives if not d.startswith(("--job-name=", "--output=")))


def _job_directives(
    run: RunConfig, spec: JobSpec, name: str, partition: str | None, *own: str, nodes: int | None = None
) -> list[str]:
    """The directives every qlaunch job has (name, size, partition, account…), `own` before the
    log options, the user's extra directives last (they win)."""
    res, slurm = spec.resources, run.slurm
    directives = [
        f"--job-name={name}",
        f"--nodes={res.nodes if nodes is None else nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={res.cpus_per_task}",
        f"--mem={res.memory}",
        f"--time={res.time_limit}",
    ]
    if res.gpus_per_node:
        directives.append(f"--gres=gpu:{res.gpu_type}:{res.gpus_per_node}")
    directives += _common_directives(run, partition)
    directives += [
        "--requeue" if slurm.requeue else "--no-requeue",
        *own,
        "--open-mode=append",
        f"--output={spec.log}",
        *slurm.extra_directives,
    ]
    return directives


def _train_directives(run: RunConfig, spec: JobSpec) -> list[str]:
    # USR1 to the step's processes (training.launch), not to this script.
    return _job_directives(run, spec, job_name(run), run.slurm.partition, f"--signal=USR1@{run.slurm.signal_seconds}")


def _infer_directives(run: RunConfig, spec: JobSpec) -> list[str]:
    # If training fails, the dependency can never be met: cancel instead of pending forever.
    return _job_directives(
        run,
        spec,
        job_name(run, infer=True),
        run.slurm.inference_partition or run.slurm.partition,
        "--kill-on-invalid-dep=yes",
    )


# Multi-node steps: how long the other nodes may take to end after the first one did (all stop
# within seconds of each other after a checkpoint; a rank stuck after a peer crashed does not).
TASK_WAIT_SECONDS = 120


def _context(run: RunConfig, spec: JobSpec) -> dict:
    env = run.environment
    token_file = run.model.hf_token_file
    return {
        "experiment": run.name,
        "run_id": run.run_id,
        "overrides": json.dumps(run.overrides, sort_keys=True, ensure_ascii=True),
        "setup": env.setup,
        "variables": spec.env,
        "hub_env": sorted(offline_env(run).items()),  # prefetched: read the shared cache offline
        "task_wait_seconds": TASK_WAIT_SECONDS,
        "container": env.container,
        "container_runtime": env.container_runtime,
        "binds": ",".join(spec.mounts),
        "bind_list": list(spec.mounts),
        "pass_env": _container_env(run, spec),
        # The token file's path (never its content) is bound into docker/podman containers; a
        # ~/ path is the job's business (expanding it here would make rendering impure).
        "hf_token_file": token_file if token_file and token_file.startswith("/") else None,
        "gpus": spec.resources.gpus_per_node,
        "hf_token_env": run.model.hf_token_env,
        "run_dir": spec.workdir,
        "command": spec.command,
    }


# What a docker/podman container gets from the job's shell (apptainer passes everything): what
# the job script exports, the token by name, where caches go, and Slurm's own task variables.
_CONTAINER_ENV = (
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODEID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_RESTART_COUNT",
)


def _container_env(run: RunConfig, spec: JobSpec) -> list[str]:
    names = [name for name, _ in spec.env] + sorted(offline_env(run))
    names += [run.model.hf_token_env, *_CONTAINER_ENV]
    return list(dict.fromkeys(names))


def _requeue_guard(run: RunConfig) -> dict:
    """The batch script's half of launcher/job/requeue.py: the limits, and the messages with the
    shell variables that hold the counts (inside double quotes: no quote, backslash or `$(`)."""
    res = run.resources
    cap = requeue.cap_message("$restart", res.max_requeues)
    stall = requeue.stall_message("$stalled", res.max_requeues_without_progress)
    assert not re.search(r'["`\\]|\$\(', cap + stall), "the guard's messages go inside double quotes"
    return {
        "max_requeues": res.max_requeues,
        "max_without_progress": res.max_requeues_without_progress,
        "cap_message": cap,
        "stall_message": stall,
        "requeue_log": requeue.LOG_NAME,
        "stopped_file": requeue.STOPPED_NAME,
        "exit_exhausted": requeue.EXIT_REQUEUES_EXHAUSTED,
    }


def render_run(run: RunConfig) -> RunScripts:
    """The training script and (when enabled) the inference script of one run."""
    _validate(run)
    jobs = job_specs(run)
    train_directives = _train_directives(run, jobs.train)
    train = templates.render(
        "slurm",
        "train.sbatch.j2",
        **_context(run, jobs.train),
        directives=[directive(d) for d in train_directives],
        nodes=jobs.train.resources.nodes,
        signal_seconds=run.slurm.signal_seconds,
        requeue=run.slurm.requeue,
        exit_preempted=EXIT_PREEMPTED,
        **_requeue_guard(run),
    )
    infer, infer_scheduling = None, ()
    if jobs.infer is not None:
        infer_directives = _infer_directives(run, jobs.infer)
        infer = templates.render(
            "slurm",
            "infer.sbatch.j2",
            **_context(run, jobs.infer),
            directives=[directive(d) for d in infer_directives],
        )
        infer_scheduling = _scheduling(infer_directives)
    return RunScripts(run.run_id, train, infer, _scheduling(train_directives), infer_scheduling)


EXPORT_SCRIPT = "export.sbatch"


def _export_directives(run: RunConfig, spec: JobSpec) -> list[str]:
    # A requeued export starts again from nothing (it writes beside its folder, renamed at the end).
    return _job_directives(
        run, spec, f"{job_name(run)}-export", run.slurm.inference_partition or run.slurm.partition, nodes=1
    )


def render_export(run: RunConfig, spec: JobSpec, finish: list[str]) -> tuple[str, tuple[str, ...]]:
    """`qlaunch export --backend slurm`: (script text, the directives sbatch --test-only is asked
    about). Like the inference script (same environment block, container, partition), with the
    export job's own resources (launcher.jobspec.export_resources) and two steps: training.export,
    then the push and exports.json (`finish`)."""
    _validate(run)
    out = spec.args[spec.args.index("--out") + 1]
    _check_path(out, "--output")
    directives = _export_directives(run, spec)
    push = "--push-to-hub" in finish
    text = templates.render(
        "slurm",
        "export.sbatch.j2",
        **_context(run, spec),
        directives=[directive(d) for d in directives],
        out=out,
        finish=finish,
        push=push,
        offline_names=[name for name in sorted(offline_env(run)) if push and name.endswith("_OFFLINE")],
    )
    return text, _scheduling(directives)
