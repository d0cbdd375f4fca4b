"""lm-evaluation-harness task names and datasets, read from task YAML files (issue #29).

`inference.lm_eval.tasks` is checked when the grid is planned, on a login node: lm_eval (and the
torch it needs) cannot be imported there. Its tasks are YAML files, so the names are read from
them as text: every `task:`, `group:` and `tag:` of the installed lm_eval's `tasks/` folder (found
with importlib's `find_spec`, which runs none of lm_eval's code) and of the user's
`inference.lm_eval.include_path` folder. Where lm_eval is not installed on the submitting machine,
only the local names are checked and the job checks the rest (it refuses an unknown name the
same way before it loads the model).

A task's dataset is local when `dataset_path` is a loader of `datasets` for files (json, csv,
parquet, text, arrow) with `dataset_kwargs.data_files`, or an existing folder; anything else is a
hub dataset. Relative `data_files` are relative to the include_path folder (the job evaluates
there). The job of a cluster backend runs where the hub may not be reachable: a task with a hub
dataset is refused at plan time there unless `inference.lm_eval.allow_hub: true` says the nodes
can download it (qlaunch prefetch does not fetch lm-eval datasets).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FILE_LOADERS = {"json", "csv", "parquet", "text", "arrow"}
_TOP_KEY = re.compile(r"""^["']?(task|group|tag)["']?:[ \t]*(.*?)[ \t]*$""")
_LIST_ITEM = re.compile(r"^[ \t]+-[ \t]+([^\s#]+)")


@dataclass(frozen=True)
class TaskFile:
    name: str
    kind: str  # task | group | tag
    path: Path | None  # the YAML that defines it (None for a tag: its members do)
    members: tuple[str, ...] = ()  # a tag's tasks


def builtin_tasks_dir() -> Path | None:
    """The installed lm_eval's tasks/ folder, without importing lm_eval."""
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "tasks"
    return folder if folder.is_dir() else None


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _scalar(value: str) -> list[str]:
    value = value.split(" #", 1)[0].strip()
    if value.startswith("[") and value.endswith("]"):
        return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
    return [value.strip("'\"")] if value else []


def _names_in(text: str) -> list[tuple[str, str]]:
    """(kind, name) of one YAML file's top-level task/group/tag keys (a group's `task:` list is
    its members, not names)."""
    found: list[tuple[str, str]] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _TOP_KEY.match(line)
        if not match:
            continue
        kind, value = match.groups()
        values = _scalar(value)
        if not value and kind == "tag":
            for following in lines[index + 1 :]:
                item = _LIST_ITEM.match(following)
                if not item:
                    break
                values.append(item.group(1).strip("'\""))
        if kind == "task" and not value:
            continue  # a group's member list
        found += [(kind, v) for v in values]
    return found


@functools.lru_cache(maxsize=8)
def scan(folder: str) -> dict[str, TaskFile]:
    """Every task, group and tag name defined by the YAML files under `folder`."""
    names: dict[str, TaskFile] = {}
    tags: dict[str, list[str]] = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            kinds = _names_in(text)
            tasks = [value for kind, value in kinds if kind == "task"]
            for kind, value in kinds:
                if kind == "task" or (kind == "group" and not tasks):
                    names[value] = TaskFile(value, kind, path)
                else:  # a tag, or a task's old-style `group:` (a tag too)
                    tags.setdefault(value, []).extend(tasks)
    for tag, members in tags.items():
        names.setdefault(tag, TaskFile(tag, "tag", None, tuple(members)))
    return names


def known_tasks(include_path: Path | None) -> tuple[dict[str, TaskFile], bool]:
    """The names a job with this include_path can run, and whether lm_eval's own were read."""
    names: dict[str, TaskFile] = {}
    builtin = builtin_tasks_dir()
    if builtin is not None:
        names.update(scan(str(builtin)))
    if include_path is not None and include_path.is_dir():
        names.update(scan(str(include_path)))
    return names, builtin is not None


# --- a task's dataset -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !function helpers


def task_config(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML with its `include:` chain merged (the file's keys win)."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    include = data.get("include")
    if isinstance(include, str) and depth < 8:
        base = Path(include) if Path(include).is_absolute() else path.parent / include
        data = {**task_config(base, depth + 1), **{k: v for k, v in data.items() if k != "include"}}
    return data


def member_tasks(name: str, names: dict[str, TaskFile], seen: set[str] | None = None) -> list[TaskFile]:
    """The tasks a name runs: itself, a group's members, or a tag's tasks."""
    seen = set() if seen is None else seen
    if name in seen or name not in names:
        return []
    seen.add(name)
    entry = names[name]
    if entry.kind == "task":
        return [entry]
    members: list[TaskFile] = []
    if entry.kind == "group" and entry.path is not None:
        listed = task_config(entry.path).get("task") or []
        for item in listed if isinstance(listed, list) else [listed]:
            member = item.get("task") if isinstance(item, dict) else item
            if isinstance(member, str):
                members += member_tasks(member, names, seen)
        return members
    for member in entry.members:  # a tag
        members += member_tasks(member, names, seen)
    return members


@dataclass(frozen=True)
class Dataset:
    task: str
    path: str  # dataset_path as written
    local_files: tuple[Path, ...]  # data_files resolved against the include_path folder
    hub: bool


def dataset_of(task: TaskFile, include_path: Path | None) -> Dataset:
    config = task_config(task.path) if task.path else {}
    dataset_path = str(config.get("dataset_path") or "")
    kwargs = config.get("dataset_kwargs") or {}
    data_files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    files: list[str] = []
    if isinstance(data_files, str):
        files = [data_files]
    elif isinstance(data_files, list):
        files = [f for f in data_files if isinstance(f, str)]
    elif isinstance(data_files, dict):
        for value in data_files.values():
            files += [value] if isinstance(value, str) else [f for f in value or [] if isinstance(f, str)]
    base = include_path or (task.path.parent if task.path else Path("."))
    resolved = tuple(Path(f) if Path(f).is_absolute() else base / f for f in files)
    local = (dataset_path in FILE_LOADERS and bool(files)) or (bool(dataset_path) and Path(dataset_path).is_dir())
    return Dataset(task.name, dataset_path, resolved, hub=not local)


# --- plan-time findings -----------------------------------------------------------------------------


def _include_folder(run) -> Path | None:
    settings = run.inference.lm_eval
    return run.resolve_path(settings.include_path) if settings and settings.include_path else None


def name_findings(run) -> list:
    """Unknown task names (one finding listing close names) and a missing include_path folder."""
    import difflib

    from .run_checks import Finding

    settings = run.inference.lm_eval
    if settings is None:
        return []
    if run.inference.per_run:
        return [
            Finding(
                "inference.lm_eval",
                "lm-eval tasks run in the grid evaluation job (base model loaded once for every adapter); "
                "remove inference.per_run: true to have them run",
            )
        ]
    folder = _include_folder(run)
    if folder is not None and not folder.is_dir():
        return [Finding("inference.lm_eval.include_path", f"no folder {folder} (task YAMLs are read from it)")]
    names, builtin = known_tasks(folder)
    unknown = [task for task in settings.tasks if task not in names]
    if not builtin:
        # lm_eval is not installed here: its own names are the job's to check (it refuses an
        # unknown one before loading the model); a local task's name can still be checked.
        return []
    if not unknown:
        return []
    parts = []
    for task in unknown:
        close = difflib.get_close_matches(task, list(names), n=3, cutoff=0.6)
        hint = f" (close names: {', '.join(repr(c) for c in close)})" if close else " (no close name)"
        parts.append(f"{task!r}{hint}")
    where = f"lm_eval {lm_eval_version()}" + (f" and {folder}" if folder else "")
    return [Finding("inference.lm_eval.tasks", f"no such lm-eval task in {where}: {'; '.join(parts)}")]


def dataset_findings(run, remote: bool, storage_root: Path | None = None) -> list:
    """A local task's data files that are missing; on a backend whose jobs run elsewhere (a
    cluster), tasks that would download their dataset from the hub, unless allow_hub. With
    `storage_root` (a backend whose pods see only their claim, Kubernetes): any include_path,
    which is not staged into the pods."""
    from .run_checks import Finding

    settings = run.inference.lm_eval
    if settings is None:
        return []
    folder = _include_folder(run)
    if folder is not None and not folder.is_dir():
        return []  # name_findings says it
    if folder is not None and storage_root is not None:
        return [
            Finding(
                "inference.lm_eval.include_path",
                f"{folder}: the pods cannot read a task folder of this machine (qlaunch stages data files "
                "into the cluster, not lm-eval task folders yet); on Kubernetes use lm-eval's own tasks "
                "(with inference.lm_eval.allow_hub: true)",
            )
        ]
    names, _ = known_tasks(folder)
    findings, hub = [], []
    for task in settings.tasks:
        for member in member_tasks(task, names):
            dataset = dataset_of(member, folder)
            missing = [str(f) for f in dataset.local_files if not dataset.hub and not any(c in str(f) for c in "*?[")]
            missing = [f for f in missing if not Path(f).is_file()]
            if missing:
                findings.append(
                    Finding(
                        "inference.lm_eval.tasks",
                        f"task {member.name!r} ({member.path}): data file {missing[0]} does not exist "
                        "(relative data_files are relative to inference.lm_eval.include_path)",
                        missing[0],
                    )
                )
            if dataset.hub and dataset.path:
                hub.append(f"{member.name} ({dataset.path})")
    if hub and remote and not settings.allow_hub:
        shown = ", ".join(hub[:5]) + (f" and {len(hub) - 5} more" if len(hub) > 5 else "")
        findings.append(
            Finding(
                "inference.lm_eval.tasks",
                f"reads its dataset from the hub: {shown}. The evaluation job runs on the cluster, "
                "where the hub may not be reachable and qlaunch prefetch does not fetch lm-eval datasets: "
                "use a local task (a YAML over your own files in inference.lm_eval.include_path), or set "
                "inference.lm_eval.allow_hub: true if the nodes can download it",
            )
        )
    return findings
