"""Where the trackers of an experiment keep their files, for `qlaunch tensorboard` (no tracker
imported here: the launcher runs where they may not be installed)."""

from __future__ import annotations

import shlex
from pathlib import Path

from .grid import Plan
from .job.storage import tensorboard_root


def experiment_folder(plan: Plan) -> Path:
    return plan.storage_root / plan.experiment.name


def tensorboard_command(plan: Plan, port: int | None = None) -> list[str]:
    command = ["tensorboard", "--logdir", str(tensorboard_root(experiment_folder(plan)))]
    return command + (["--port", str(port)] if port else [])


def printable(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
