"""Printing and following log files on (shared) storage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Callable


def follow_file(
    path: Path,
    out: IO[str],
    *,
    follow: bool,
    active: Callable[[], bool],
    poll_seconds: float = 0.5,
    settle_seconds: float = 2.0,
) -> None:
    """Print `path`; with `follow`, keep printing what is appended while `active()` holds.

    Jobs append to the same file across requeues and restarts (open-mode append), so following
    one file follows the run. After the job stops we read for `settle_seconds` more: shared
    filesystems show the last writes late.
    """
    position = 0
    idle_since: float | None = None
    while True:
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read()
            if chunk:
                position += len(chunk)
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
        if not follow:
            if not path.exists():
                out.write(f"(no log yet: {path})\n")
            return
        if active():
            idle_since = None
        else:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle_seconds:
                return
        time.sleep(poll_seconds)
