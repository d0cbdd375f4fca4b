"""What an attempt ran on: `<run dir>/attempts/<n>/environment.json`.

A grid is only comparable if its runs trained under the same libraries (and a CPU run's answers
once depended on the CPU's flags, issue #8), so every training attempt writes this before it
trains, and `qlaunch status` compares the records of a grid (launcher/job/environments.py).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from launcher.job.environments import LIBRARIES, environment_file
from launcher.job.storage import RunPaths, write_json

# The flags that change which kernels bitsandbytes and torch pick on a CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    if os.environ.get("QLAUNCH_GIT_COMMIT"):  # set by an image build, where .git is absent
        return os.environ["QLAUNCH_GIT_COMMIT"]
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and model:
                break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def _scheduler() -> dict:
    keys = (
        "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT",
        "SLURM_NODEID",
        "SLURM_JOB_NODELIST",
        "JOB_COMPLETION_INDEX",
        "RANK",
        "WORLD_SIZE",
    )
    record = {key.lower(): os.environ[key] for key in keys if key in os.environ}
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        record["kubernetes_pod"] = socket.gethostname()
    return record


def collect() -> dict:
    import torch

    cpu_model, cpu_flags = _cpu()
    cuda = torch.cuda.is_available()
    versions = {name: _version(name) for name in LIBRARIES}
    versions["python"] = platform.python_version()
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda if cuda else None
    return {
        "versions": versions,
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpu_model": cpu_model,
        "cpu_flags": cpu_flags,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "scheduler": _scheduler(),
        "time": round(time.time(), 3),
    }


def record_attempt(paths: RunPaths, attempt: int) -> dict:
    record = {"attempt": attempt, **collect()}
    write_json(environment_file(paths.root, attempt), record)
    return record
