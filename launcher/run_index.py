"""Where runs were submitted from, so `qlaunch logs <run>`, `infer <run>` and `cancel <run>` work
with just a run id.

Only the commands that start work write here: `qlaunch run` and `qlaunch submit` (not
`--dry-run`). Commands that only read (`status`, `report`, `plan`, `render`, `submit --dry-run`)
never do, so looking at a copy of an experiment file cannot re-point a run.

Run ids hash only the training, so copies of one experiment file (another name, another storage
root, another cluster) give the same ids. Each run id therefore keeps one entry per run folder
it was submitted into: the experiment file, the backend (and the kubeconfig/context) it went to.
`$QLAUNCH_HOME/runs.json` (default ~/.qlaunch):

    {"version": 2, "runs": {"<run id>": [{"experiment", "file", "run_dir", "backend",
                                          "kubeconfig"?, "context"?, "submitted_at"}, ...]}}

When a run id has several entries, `resolve` keeps those whose file still plans that run into
that folder and, where the folder is visible here (local, Slurm), those that left something in it
(submission.json, a log, progress); if more than one is left, one error lists the experiment
files and how to pick (`-e FILE`). Ids are hashes, so a short prefix is enough.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from .grid import Plan
from .grid import plan as _plan
from .job.errors import ConfigError
from .job.storage import atomic_write_text

VERSION = 2
# What a submission leaves in a run folder on storage this machine sees (local, Slurm).
_TRACES = ("submission.json", "local.json", "train.log", "progress.jsonl")


def home() -> Path:
    """$QLAUNCH_HOME (default ~/.qlaunch): the run index, and the runner's submit locks."""
    return Path(os.environ.get("QLAUNCH_HOME", "~/.qlaunch")).expanduser()


def _index_path() -> Path:
    return home() / "runs.json"


def _load() -> dict[str, list[dict]]:
    """run id → entries. A version-1 index (run id → one entry, no run folder) is read as is."""
    try:
        data = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("version") == VERSION:
        runs = data.get("runs") if isinstance(data.get("runs"), dict) else {}
        return {
            k: [e for e in v if isinstance(e, dict) and "file" in e] for k, v in runs.items() if isinstance(v, list)
        }
    return {k: [v] for k, v in data.items() if isinstance(v, dict) and "file" in v}


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` for the block, waited for; none where there is no flock (not
    POSIX) or the folder cannot be written (a read-only home must not stop a submission)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _locked():
    """Concurrent submits must not drop each other's entries (read-modify-write under a lock)."""
    return file_lock(home() / "runs.json.lock")


def _shares_storage(backend_name: str | None) -> bool:
    from .backends import backend_class  # the backends import the plan, which imports this

    try:
        return backend_class(backend_name or "local").shares_storage
    except ConfigError:  # a backend this version does not know: assume it does
        return True


def _kube_target(backend: Any) -> dict[str, str]:
    kube = getattr(backend, "kube", None)
    target = {}
    if getattr(kube, "kubeconfig", None):
        target["kubeconfig"] = str(Path(kube.kubeconfig).expanduser().resolve())
    if getattr(kube, "context", None):
        target["context"] = kube.context
    return target


def record(p: Plan, backend: Any) -> None:
    """Remember where each run of `p` was just submitted (`backend`: a Backend or its name).
    Called only by commands that start or submit work."""
    name = backend if isinstance(backend, str) else backend.name
    target = {} if isinstance(backend, str) else _kube_target(backend)
    try:
        with _locked():
            index = _load()
            for run in p.runs:
                entry = {
                    "experiment": p.experiment.name,
                    "file": str(p.source),
                    "run_dir": run.run_dir,
                    "backend": name,
                    **target,
                    # --set KEY=VALUE it was started with: `logs/cancel/infer <run>` plan it the same way
                    **({"settings": list(p.settings)} if p.settings else {}),
                    "submitted_at": round(time.time(), 3),
                }
                # One entry per run folder: submitting into the same folder again replaces it.
                others = [e for e in index.get(run.run_id, []) if not _same_folder(e, run.run_dir, p.source)]
                index[run.run_id] = [*others, entry]
            atomic_write_text(_index_path(), json.dumps({"version": VERSION, "runs": index}, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home must not stop a submission; ids still work with -e


def _same_folder(entry: dict, run_dir: str, source: Path) -> bool:
    """Whether an entry is about this run folder (a version-1 entry: recorded from this file)."""
    if entry.get("run_dir"):
        return entry["run_dir"] == run_dir
    return Path(entry["file"]) == source


class Resolved(NamedTuple):
    plan: Plan
    backend: str  # the backend the runs were submitted to (else the file's `backend:`)
    runs: list
    kubeconfig: str | None = None
    context: str | None = None


def _resolved(p: Plan, runs: list, entry: dict | None) -> Resolved:
    entry = entry or {}
    return Resolved(p, entry.get("backend", p.experiment.backend), runs, entry.get("kubeconfig"), entry.get("context"))


def _entry_for(p: Plan, runs: list) -> dict | None:
    """The newest entry recorded for one of these runs in the folder this plan puts it in."""
    index = _load()
    entries = [e for run in runs for e in index.get(run.run_id, []) if _same_folder(e, run.run_dir, p.source)]
    return max(entries, key=lambda e: e.get("submitted_at", 0), default=None)


def submitted_to(p: Plan) -> Resolved | None:
    """Where this plan's runs (in the folders it puts them) were last submitted, if anywhere."""
    entry = _entry_for(p, list(p.runs))
    return _resolved(p, list(p.runs), entry) if entry else None


@dataclass
class _Candidate:
    entry: dict
    plan: Plan | None = None
    why_not: str = ""  # why the entry no longer names this run

    @property
    def run_dir(self) -> str:
        return self.entry.get("run_dir") or "?"

    def left_traces(self) -> bool:
        if not _shares_storage(self.entry.get("backend")):
            return True  # its storage is elsewhere (a cluster's claim): this machine cannot tell
        return any((Path(self.run_dir) / name).exists() for name in _TRACES)


def _planned(entry: dict, settings: Sequence[str]) -> Plan:
    """The entry's file, planned with the user's --set, or else the --set it was started with."""
    return _plan(entry["file"], settings=tuple(settings) or tuple(entry.get("settings", ())))


def _candidate(run_id: str, entry: dict, settings: Sequence[str]) -> _Candidate:
    found = _Candidate(entry)
    try:
        found.plan = _planned(entry, settings)
    except ConfigError as exc:
        found.why_not = str(exc)
        return found
    runs = [r for r in found.plan.runs if r.run_id == run_id]
    if not runs:
        found.why_not = f"{entry['file']} no longer plans run {run_id} (edited since)"
    elif entry.get("run_dir") not in (None, runs[0].run_dir):
        found.why_not = f"{entry['file']} now puts run {run_id} in {runs[0].run_dir}, not {entry['run_dir']}"
    else:
        entry.setdefault("run_dir", runs[0].run_dir)
    return found


def _ambiguous(what: str, ref: str, command: str, candidates: list[_Candidate]) -> ConfigError:
    lines = [f"{what} was submitted from {len(candidates)} experiment files; say which with -e FILE:"]
    for c in sorted(candidates, key=lambda c: c.entry.get("submitted_at", 0)):
        when = c.entry.get("submitted_at")
        stamp = time.strftime(", submitted %Y-%m-%d %H:%M", time.localtime(when)) if when else ""
        lines.append(
            f"  -e {shlex.quote(c.entry['file'])}  ({c.entry.get('backend', '?')}, runs in {c.run_dir}{stamp})"
        )
    newest = max(candidates, key=lambda c: c.entry.get("submitted_at", 0))
    lines.append(f"e.g. qlaunch {command} {shlex.quote(ref)} -e {shlex.quote(newest.entry['file'])}")
    return ConfigError("\n".join(lines))


def _pick(what: str, ref: str, command: str, candidates: list[_Candidate], traces: bool = True) -> _Candidate:
    live = [c for c in candidates if c.plan is not None and not c.why_not]
    if not live:
        reasons = "; ".join(c.why_not for c in candidates)
        raise ConfigError(
            f"{what} was submitted from files that no longer plan it ({reasons}); name the experiment file with -e FILE"
        )
    # Prefer folders the run really left something in (a submission, a log) over ones that only
    # an older qlaunch recorded (version 1 wrote entries for status and dry runs too).
    pool = (traces and [c for c in live if c.left_traces()]) or live
    if len(pool) > 1:
        raise _ambiguous(what, ref, command, pool)
    return pool[0]


def resolve(
    ref: str, experiment_file: str | None = None, command: str = "logs", settings: Sequence[str] = ()
) -> Resolved:
    """A run id (prefix), an experiment name or an experiment file → the plan, the backend the
    runs were submitted to, the runs (and the kubeconfig/context they were submitted with). The
    experiment is read with `settings` (`--set KEY=VALUE`) applied. `command` only words the hint
    of an ambiguity error."""
    plan = functools.partial(_plan, settings=settings)
    if experiment_file:
        p = plan(experiment_file)
        runs = p.find(ref)
        return _resolved(p, runs, _entry_for(p, runs))
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
        p = plan(ref)
        return _resolved(p, list(p.runs), _entry_for(p, list(p.runs)))
    index = _load()
    by_file: dict[str, dict] = {}
    for entries in index.values():
        for e in entries:
            if e.get("experiment") == ref and e.get("submitted_at", 0) >= by_file.get(e["file"], {}).get(
                "submitted_at", 0
            ):
                by_file[e["file"]] = e
    if by_file:
        candidates = []
        for entry in by_file.values():
            try:
                candidates.append(_Candidate(entry, _planned(entry, settings)))
            except ConfigError as exc:
                candidates.append(_Candidate(entry, why_not=str(exc)))
        for c in candidates:
            if c.plan is not None and c.plan.experiment.name != ref:
                c.why_not = f"{c.entry['file']} now names experiment {c.plan.experiment.name!r}"
        chosen = _pick(f"experiment {ref!r}", ref, command, candidates, traces=False)
        return _resolved(chosen.plan, list(chosen.plan.runs), chosen.entry)
    matches = sorted(run_id for run_id in index if run_id.startswith(ref))
    if len(matches) == 1:
        run_id = matches[0]
        chosen = _pick(f"run {run_id}", ref, command, [_candidate(run_id, e, settings) for e in index[run_id]])
        return _resolved(chosen.plan, chosen.plan.find(run_id), chosen.entry)
    if not matches:
        raise ConfigError(
            f"no run or experiment {ref!r} known here; name the experiment file with -e FILE "
            f"(runs are remembered in {_index_path()} once submitted)"
        )
    raise ConfigError(f"{ref!r} matches several runs: {', '.join(matches)}; give more characters")
