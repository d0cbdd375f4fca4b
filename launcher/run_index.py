"""Where runs live, so `qlaunch logs <run>` and `cancel <run>` work with just a run id.

`qlaunch run/submit/status` record each run id with its experiment file and backend in
`$QLAUNCH_HOME/runs.json` (default ~/.qlaunch). Ids are hashes, so a short prefix is enough.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError
from .grid import Plan
from .grid import plan as _plan
from .storage import atomic_write_text


def _index_path() -> Path:
    return Path(os.environ.get("QLAUNCH_HOME", "~/.qlaunch")).expanduser() / "runs.json"


def _load() -> dict[str, dict]:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def record(p: Plan, backend: str) -> None:
    index = _load()
    changed = False
    for run in p.runs:
        entry = {"experiment": p.experiment.name, "file": str(p.source), "backend": backend}
        if index.get(run.run_id) != entry:
            index[run.run_id] = entry
            changed = True
    if changed:
        try:
            atomic_write_text(_index_path(), json.dumps(index, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only home must not stop a submission; ids still work with -e


def resolve(ref: str, experiment_file: str | None = None, settings: Sequence[str] = ()) -> tuple[Plan, str, list]:
    """A run id (prefix), an experiment name or an experiment file → (plan, backend, runs); the
    experiment is read with `settings` (`--set KEY=VALUE`) applied."""
    plan = functools.partial(_plan, settings=settings)
    if experiment_file:
        p = plan(experiment_file)
        return p, _load().get(p.runs[0].run_id, {}).get("backend", p.experiment.backend), p.find(ref)
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
        p = plan(ref)
        return p, _load().get(p.runs[0].run_id, {}).get("backend", p.experiment.backend), list(p.runs)
    index = _load()
    by_experiment = {e["file"]: e for e in index.values() if e["experiment"] == ref}
    if len(by_experiment) == 1:
        entry = next(iter(by_experiment.values()))
        p = plan(entry["file"])
        return p, entry["backend"], list(p.runs)
    matches = sorted(run_id for run_id in index if run_id.startswith(ref))
    if len(matches) == 1:
        entry = index[matches[0]]
        p = plan(entry["file"])
        return p, entry["backend"], p.find(matches[0])
    if not matches:
        raise ConfigError(
            f"no run or experiment {ref!r} known here; name the experiment file with -e FILE "
            f"(runs are remembered in {_index_path()} once submitted)"
        )
    raise ConfigError(f"{ref!r} matches several runs: {', '.join(matches)}; give more characters")
