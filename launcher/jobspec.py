"""One run's jobs, neutral about where they run (after TorchX's `AppDef`/`Role`).

`job_specs(run)` is built once per run from its `RunConfig`; each backend materialises the
specs its own way: the local backend as processes, Slurm as sbatch scripts, Kubernetes as Job
objects. Whatever the backend, the training job's command is
`python -m training.launch <run.yaml>`: training.launch owns accelerate's flags, the signal
forwarding and exit code 75, so none of that is written again here or in a backend.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .job.config import RunConfig
from .job.storage import RunPaths

TRAIN, INFER, EXPORT = "train", "infer", "export"
# The folder that holds the `launcher` and `training` packages (a checkout or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for."""

    nodes: int
    gpus_per_node: int
    gpu_type: str
    cpus_per_task: int
    memory: str  # Slurm-style size: 32G, 64000M
    time_limit: str  # [D-]HH:MM:SS
    time_limit_seconds: int


@dataclass(frozen=True)
class JobSpec:
    """One job of a run: what to start, with what, where its output goes."""

    run_id: str
    role: str  # TRAIN | INFER | EXPORT
    python: str
    module: str  # training.launch | training.infer | training.export
    run_yaml: str
    args: tuple[str, ...]  # after the run.yaml
    env: tuple[tuple[str, str], ...]  # set by the job (environment.variables), secrets never
    resources: Resources
    workdir: str  # the run folder
    log: str  # appended across restarts
    mounts: tuple[str, ...]  # folders the job needs at the same path (storage root, experiment)

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", self.module, self.run_yaml, *self.args]

    def placed(
        self, *, python: str | None = None, run_yaml: str | None = None, args: tuple[str, ...] = ()
    ) -> "JobSpec":
        """The same job where the backend puts it: another interpreter (the local backend runs
        this qlaunch's), run.yaml at another path (a Kubernetes ConfigMap mount), extra
        arguments (the rendezvous host, which only the backend knows)."""
        return replace(
            self, python=python or self.python, run_yaml=run_yaml or self.run_yaml, args=self.args + tuple(args)
        )


@dataclass(frozen=True)
class RunJobs:
    train: JobSpec
    infer: JobSpec | None  # None when inference.enabled is false


def _resources(run: RunConfig, role: str) -> Resources:
    if role == INFER:
        return inference_resources(run)
    res = run.resources
    return Resources(
        nodes=res.nodes,
        gpus_per_node=res.gpus_per_node,
        gpu_type=res.gpu_type,
        cpus_per_task=res.cpus_per_task,
        memory=res.memory,
        time_limit=res.time_limit,
        time_limit_seconds=res.time_limit_seconds(),
    )


# The inference job answers a few prompts: what it asks for when inference.resources does not say.
INFER_CPUS = 4
INFER_TIME_LIMIT = "01:00:00"
INFER_MEMORY_UNKNOWN_MODEL_MIB = 16 * 1024
# Host memory on top of the weights: Python, torch, CUDA context, tokenizer, generation buffers.
INFER_MEMORY_HEADROOM_MIB = 4 * 1024
_MIB = {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024 * 1024}


def memory_mib(value: str) -> float:
    """A Slurm-style size (32G, 64000M; a bare number is MiB) in MiB."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", value).groups()
    return int(number) * _MIB[unit]


def inference_memory(run: RunConfig, gpus: int) -> str:
    """Host memory for the inference job: the base model's weights as they pass through host
    memory while loading (float16 shards on their way to the GPU; float32 when it answers on
    CPU), plus headroom; a model qlaunch does not know (launcher.preflight.model_shape) gets 16G.
    Never more than training asks for."""
    from .preflight import model_shape  # the known-model table; no torch

    shape = model_shape(run)
    if shape is None:
        wanted = INFER_MEMORY_UNKNOWN_MODEL_MIB
    else:
        wanted = math.ceil(shape.num_params * (2 if gpus else 4) / 2**20) + INFER_MEMORY_HEADROOM_MIB
    gib = math.ceil(min(wanted, memory_mib(run.resources.memory)) / 1024)
    return f"{max(gib, 1)}G"


def inference_resources(run: RunConfig) -> Resources:
    """What the inference job asks for: inference.resources where set, else one node, at most one
    GPU (it generates on one), at most 4 CPUs, one hour and the memory the model needs to load
    (inference_memory); each derived value at most what training asks for."""
    res, own = run.resources, run.inference.resources
    gpus = own.gpus_per_node if own.gpus_per_node is not None else min(res.gpus_per_node, 1)
    if own.time_limit is not None:
        time_limit = own.time_limit
    else:
        time_limit = min((INFER_TIME_LIMIT, res.time_limit), key=_seconds)
    return Resources(
        nodes=1,
        gpus_per_node=gpus,
        gpu_type=res.gpu_type,
        cpus_per_task=own.cpus_per_task or min(res.cpus_per_task, INFER_CPUS),
        memory=own.memory or inference_memory(run, gpus),
        time_limit=time_limit,
        time_limit_seconds=_seconds(time_limit),
    )


def _seconds(time_limit: str) -> int:
    days, _, hms = time_limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def job_specs(run: RunConfig) -> RunJobs:
    """The run's training job and (when enabled) its inference job."""
    paths = RunPaths.of(run)
    common = dict(
        run_id=run.run_id,
        python=run.environment.python,
        run_yaml=str(paths.config),
        args=(),
        env=tuple(sorted(run.environment.variables.items())),
        workdir=str(paths.root),
        mounts=_mounts(run),
    )
    train = JobSpec(
        role=TRAIN, module="training.launch", resources=_resources(run, TRAIN), log=str(paths.train_log), **common
    )
    return RunJobs(train, inference_job(run) if run.inference.enabled else None)


def inference_job(run: RunConfig) -> JobSpec:
    """The inference job, also when inference.enabled is false (`qlaunch infer --prompt`)."""
    paths = RunPaths.of(run)
    return JobSpec(
        run_id=run.run_id,
        role=INFER,
        python=run.environment.python,
        module="training.infer",
        run_yaml=str(paths.config),
        args=(),
        env=tuple(sorted(run.environment.variables.items())),
        resources=_resources(run, INFER),
        workdir=str(paths.root),
        log=str(paths.infer_log),
        mounts=_mounts(run),
    )


# The merge holds the float16 model and, on a CPU, checks it in float32: ~6 bytes per parameter at
# the peak (+ a fifth for the tokenizer, activations and allocator slack).
MERGE_BYTES_PER_PARAMETER = 6 * 1.2
# An adapter-only export copies files: Python + the training imports, whatever the model.
EXPORT_ADAPTER_MEMORY = "2G"
EXPORT_ADAPTER_TIME_LIMIT = "00:30:00"
EXPORT_LOG = "export.log"


def merge_memory_bytes(run: RunConfig) -> int | None:
    """Host memory `qlaunch export --merge` needs at its peak; None for a model qlaunch does not know."""
    from .preflight import model_shape  # the known-model table; no torch

    shape = model_shape(run)
    if shape is None:
        return None
    return int((shape.linear_params + shape.other_params) * MERGE_BYTES_PER_PARAMETER)


def export_resources(run: RunConfig, merge: bool, memory: str | None = None) -> Resources:
    """What the export job asks for: one node; a merge the host memory it needs (merge_memory_bytes,
    16G for a model qlaunch does not know), at most one GPU (the unmerged 4-bit model is checked
    there) and training's time limit; an adapter-only export 1 CPU, 2G, half an hour. `memory`
    (`qlaunch export --memory`) replaces the derived size."""
    res = run.resources
    if merge:
        need = merge_memory_bytes(run)
        wanted = f"{math.ceil(need / 2**30)}G" if need else f"{INFER_MEMORY_UNKNOWN_MODEL_MIB // 1024}G"
        gpus, cpus, time_limit = min(res.gpus_per_node, 1), min(res.cpus_per_task, INFER_CPUS), res.time_limit
    else:
        wanted, gpus, cpus = EXPORT_ADAPTER_MEMORY, 0, 1
        time_limit = min((EXPORT_ADAPTER_TIME_LIMIT, res.time_limit), key=_seconds)
    return Resources(
        nodes=1,
        gpus_per_node=gpus,
        gpu_type=res.gpu_type,
        cpus_per_task=cpus,
        memory=memory or wanted,
        time_limit=time_limit,
        time_limit_seconds=_seconds(time_limit),
    )


def export_job(run: RunConfig, out: str, merge: bool, gguf_type: str | None, memory: str | None = None) -> JobSpec:
    """`qlaunch export`'s job: the adapter (or the checked merge, and a GGUF) into `out`. Its log
    is `<run dir>/export.log`; a merge loads the base on the CPU (host memory, not GPU memory)."""
    paths = RunPaths.of(run)
    args = ("--out", out, *(("--merge",) if merge else ()), *(("--gguf", gguf_type) if gguf_type else ()))
    return JobSpec(
        run_id=run.run_id,
        role=EXPORT,
        python=run.environment.python,
        module="training.export",
        run_yaml=str(paths.config),
        args=args,
        env=tuple(sorted(run.environment.variables.items())),
        resources=export_resources(run, merge, memory),
        workdir=str(paths.root),
        log=str(paths.root / EXPORT_LOG),
        mounts=_mounts(run),
    )


def export_finish_command(spec: JobSpec, repo_id: str | None, private: bool) -> list[str]:
    """The export job's second step, after training.export: the push (when asked; the token read
    from model.hf_token_env / hf_token_file by the job) and `<run dir>/exports.json`."""
    out = spec.args[spec.args.index("--out") + 1]
    push = ("--push-to-hub", repo_id, *(() if private else ("--public",))) if repo_id else ()
    return [spec.python, "-m", "launcher.export_command", "--finish", spec.run_yaml, "--out", out, *push]


def _mounts(run: RunConfig) -> tuple[str, ...]:
    # The storage root (two levels above the run folder) and the experiment's own folder
    # (relative dataset paths resolve there).
    return tuple(sorted({str(Path(run.run_dir).parents[1]), run.experiment_dir}))


def launcher_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a job is started with from this machine (the local backend's processes,
    what sbatch passes on): the caller's, plus PYTHONPATH when qlaunch runs from a source
    checkout, so the job imports this `launcher`/`training` whichever python it runs. The one
    place PYTHONPATH is set. (An installed qlaunch is found without it, and putting
    site-packages on another interpreter's path would break that interpreter.)"""
    env = dict(os.environ if base is None else base)
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
