"""One rendered file against its snapshot, for the tests that keep one file per case."""

from __future__ import annotations

import os
from pathlib import Path

UPDATE = os.environ.get("QLAUNCH_UPDATE_SNAPSHOTS") == "1"


def assert_matches_snapshot(text: str, snapshot: Path) -> None:
    """`text` equals the file `snapshot`; with QLAUNCH_UPDATE_SNAPSHOTS=1 it is written there first."""
    if UPDATE:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(text)
    where = f"{snapshot.parent.name}/{snapshot.name}"
    assert text == snapshot.read_text(), f"{where} differs from its snapshot (QLAUNCH_UPDATE_SNAPSHOTS=1)"
