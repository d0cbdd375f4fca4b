"""Helpers for the tests that start real training / inference processes (no tests of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.job.config import RunConfig
from launcher.job.progress import read_events
from launcher.job.storage import RunPaths

REPO = Path(__file__).resolve().parents[1]


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("HF_TOKEN", None)
    # One compute thread: CI shares 2 cores between processes, and torch's spinning OpenMP threads
    # slow down badly when oversubscribed; the tiny model gains nothing from a second thread.
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_job(module: str, *args: str, log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m <module> <args>` as a real process, output to `log`, from a folder that is not
    the repository (the backends start jobs with an unspecified working directory); `env`: extra
    environment variables."""
    handle = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=job_env(env),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def run_job(
    module: str, *args: str, log: Path, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> int:
    process = start_job(module, *args, log=log, cwd=cwd, env=env)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()


def events(run: RunConfig, kind: str | None = None) -> list[dict]:
    found = read_events(RunPaths.of(run).progress)
    return [e for e in found if kind is None or e.get("event") == kind]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains `text` (a run's run.yaml path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def mount_config_map(
    config_maps: dict | list[dict], folder: Path, mount_path: str = "/config", *, same_path: bool = False
) -> Path:
    """What the kubelet does with a run's config volume: the run's ConfigMap and the ConfigMaps
    of its staged data files (one per file, shared by the grid), every key a file in `folder`
    (data as text, binaryData decoded), for a "pod" run on this machine. Unless the folder is
    mounted at `mount_path` itself (`same_path`, a container), the pod's run.yaml names files
    under `mount_path` (staged data files): those references are pointed at `folder`."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    for config_map in [config_maps] if isinstance(config_maps, dict) else config_maps:
        for key, text in (config_map.get("data") or {}).items():
            if not same_path and key == "run.yaml":
                text = text.replace(f"{mount_path}/", f"{folder}/")
            (folder / key).write_text(text)
        for key, encoded in (config_map.get("binaryData") or {}).items():
            (folder / key).write_bytes(base64.b64decode(encoded))
    return folder
