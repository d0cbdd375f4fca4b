"""The storage layout every backend and the trainer share.

<storage root>/<experiment>/<run id>/
    run.yaml            resolved run config: a job starts from this file alone
    progress.jsonl      progress events (launcher.job.progress), appended across restarts
    train.log           the training job's output (appended across requeues)
    infer.log           the inference job's output
    checkpoints/        checkpoint-<step>/ (complete ones only; partial saves are in .tmp-*)
    adapter/            final LoRA adapter + tokenizer (PeftModel.from_pretrained loads it)
    metrics.json        final training metrics; its presence means training completed
    inference/          results.jsonl, summary.json
    attempts/<n>/       environment.json: versions, device, CPU flags, host, job id of attempt n
    submission.json     backend, job ids, submission times
    requeues.log        the requeue guard's stops; requeue-stopped.txt its refusal (launcher/job/requeue.py)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .experiment_file import dump_run_config


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run: RunConfig) -> "RunPaths":
        return cls(Path(run.run_dir))

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def infer_log(self) -> Path:
        return self.root / "infer.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def inference(self) -> Path:
        return self.root / "inference"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    @property
    def submission(self) -> Path:
        return self.root / "submission.json"

    def training_completed(self) -> bool:
        return self.metrics.is_file() and (self.adapter / "adapter_config.json").is_file()

    def inference_completed(self) -> bool:
        return (self.inference / "summary.json").is_file()

    def clear_outputs(self) -> None:
        """Forget what a run produced (`--force`): it trains again from step 0. Its config,
        logs and submission record stay."""
        for path in (self.checkpoints, self.adapter, self.inference, self.attempts):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.metrics, self.progress):
            path.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc, 4.7+); else
    set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write aside and rename, so readers on shared storage never see half a file. The file
    gets the mode a plain open() would give it (0666 less the umask: group and others read it
    under the usual 022 or 002); mkstemp's own 0600 would hide reports and results from the
    team on a shared filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_config(run: RunConfig) -> Path:
    paths = RunPaths.of(run)
    text = dump_run_config(run)
    if not paths.config.is_file() or paths.config.read_text() != text:
        atomic_write_text(paths.config, text)
    return paths.config


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def tensorboard_root(experiment_dir: Path) -> Path:
    """`<storage root>/<experiment>/tensorboard/<run id>-<grid values>/`: one folder per run
    (written by the job's tracker, read by `qlaunch tensorboard`)."""
    return Path(experiment_dir) / "tensorboard"
