"""Checkpoints a preempted job can trust: a checkpoint is visible only once it is complete.

The trainer writes each checkpoint into `checkpoints/.tmp-checkpoint-<step>/` and renames it to
`checkpoints/checkpoint-<step>` when every file is on disk. A job killed mid-save leaves only a
`.tmp-*` folder, which resuming never picks (and clears away).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".tmp-"
# What HF Trainer writes last in a checkpoint; its presence is a second guard against a folder
# someone copied in by hand half-way.
TRAINER_STATE = "trainer_state.json"


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def remove_partial_saves(folder: Path) -> list[Path]:
    """Delete what saves killed mid-write left behind (`.tmp-*`)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(STAGING_PREFIX):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def staging_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"{STAGING_PREFIX}checkpoint-{step}"


def _fsync_tree(path: Path) -> None:
    # Data must be on disk before the rename makes it visible, or a node crash right after the
    # rename could leave a "complete" checkpoint with empty files.
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Make a fully written checkpoint (or adapter) folder visible under its final name."""
    _fsync_tree(staged)
    if final.exists():
        # Same step saved again (e.g. a signal right at a save_steps boundary of a resumed run).
        shutil.rmtree(final)
    os.rename(staged, final)
