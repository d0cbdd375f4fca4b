"""Grid expansion: one experiment → runs with stable ids.

A run's id is a hash of the sections that define what is trained (`IDENTITY_SECTIONS`), so
the same file always gives the same ids and resubmitting never duplicates a run, while any
changed training value gives a new id. Values at qlaunch's defaults are left out of the hash,
so a new knob (at a default that changes nothing) keeps every existing id.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from .input_checks import locate
from .job.config import IDENTITY_SECTIONS, DatasetConfig, Experiment, RunConfig, TrainConfig
from .job.errors import ConfigError
from .job.experiment_file import format_validation_error, load_experiment, locate_key
from .job.lm_eval_tasks import name_findings
from .job.loss import resolve_for_plan
from .job.recipe_checks import did_you_mean, recipe_findings, sft_arg_problem

GRID_FORBIDDEN = {"name", "grid", "backend", "storage"}


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    source: Path  # the experiment file
    storage_root: Path
    runs: tuple[RunConfig, ...]
    # Dotted key path → line in `source`, for errors found later (e.g. by a backend's checks).
    key_lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)
    # The `--set KEY=VALUE`s this plan was made with (a command that acts on it again repeats them).
    settings: tuple[str, ...] = ()
    # Dotted keys whose values came from the user config file (launcher/job/overrides.py).
    user_defaults: tuple[str, ...] = ()

    def where(self, dotted: str, run: RunConfig | None = None) -> str:
        """`file:line: key` for an error about a dotted key (of `run`: the grid value that set it)."""
        key, line = locate_key(self.key_lines, dotted, self.experiment.grid, run.overrides if run else None)
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"

    @property
    def varying_keys(self) -> list[str]:
        return list(self.experiment.grid)

    def find(self, ref: str) -> list[RunConfig]:
        """Runs named by a run id (or a unique prefix of one), or all runs for the experiment name."""
        if ref in (self.experiment.name, "all"):
            return list(self.runs)
        matches = [run for run in self.runs if run.run_id.startswith(ref)]
        if len(matches) == 1:
            return matches
        known = ", ".join(run.run_id for run in self.runs)
        if not matches:
            raise ConfigError(f"no run {ref!r} in experiment {self.experiment.name!r} (runs: {known})")
        raise ConfigError(f"{ref!r} matches several runs: {', '.join(r.run_id for r in matches)}")


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """qlaunch's defaults, built once (read only: run_id_for compares against them per run)."""
    return Experiment(name="defaults").model_dump(mode="json")


def run_id_for(resolved: dict[str, Any]) -> str:
    """Hash of the identity sections' values that differ from qlaunch's defaults. Leaving the
    defaults out keeps ids stable when a release adds a knob (at a default that changes nothing):
    resubmitting after an upgrade must not start the whole grid again."""
    defaults = _defaults()
    identity = {
        section: {
            key: value for key, value in resolved[section].items() if defaults[section].get(key, object()) != value
        }
        for section in IDENTITY_SECTIONS
    }
    # Whole-text loss is what every run trained with before the key existed: only answer-only
    # loss enters the hash, so those runs keep their ids and a changed loss gets a new one.
    if identity["train"].get("completion_only_loss") is not True:
        identity["train"].pop("completion_only_loss", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:10]


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(dotted)
    node[leaf] = value


def _get_dotted(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _check_grid_key(key: str, source: str, line: int | None) -> None:
    where = f"{source}:{line}" if line else source
    parts = key.split(".")
    if parts[0] in GRID_FORBIDDEN:
        raise ConfigError(f"{where}: grid.{key}: {parts[0]!r} cannot vary within one experiment")
    model: Any = Experiment
    for depth, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "none (not a section)"
            prefix = ".".join(parts[:depth]) or "top level"
            hint = did_you_mean(part, fields or ())
            raise ConfigError(f"{where}: grid.{key}: unknown key {part!r} under {prefix}{hint} (known: {known})")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
        if depth < len(parts) - 1 and model is None:
            # dict-valued fields such as train.sft_args accept any sub-key; sft_args' are trl's
            if parts[: depth + 1] == ["train", "sft_args"] and (problem := sft_arg_problem(parts[depth + 1])):
                raise ConfigError(f"{where}: grid.{key}: {problem}")
            return


def _check_grid_values(key: str, values: list, source: str, line: int | None) -> None:
    """Values of a key outside the run id (resources, inference, a backend's section) would all
    be one run: say so, instead of calling them duplicates."""
    where = f"{source}:{line}" if line else source
    section = key.split(".")[0]
    if section in IDENTITY_SECTIONS or len({json.dumps(v, sort_keys=True, default=str) for v in values}) < 2:
        return
    raise ConfigError(
        f"{where}: grid.{key}: {section} is not part of the run id (only {', '.join(IDENTITY_SECTIONS)} are), "
        f"so these {len(values)} values would all be the same run, in the same folder; to compare them, use "
        f"one experiment file per value, each with its own name"
    )


def _refuse_recipe_problems(runs: list[RunConfig], grid: dict, lines: dict[tuple, int], source: str) -> None:
    """Values only trl/transformers check (launcher/job/recipe_checks.py), each once, located in the
    file: a grid value's own line where a grid value set the key."""
    problems: dict[str, int] = {}
    for run in runs:
        for finding in recipe_findings(run) + name_findings(run):
            problem = locate(finding, run, grid, lines, source)
            problems.setdefault(str(problem), problem.line or 0)
    if problems:
        raise ConfigError("\n".join(sorted(problems, key=problems.__getitem__)))  # in the file's order


def _canonical_backend(experiment: Experiment, raw: dict, where: str) -> tuple[Experiment, dict]:
    """`backend:` checked against the backends' registry; an alias becomes its name."""
    from .backends import canonical  # the backends import this module

    try:
        name = canonical(experiment.backend)
    except ConfigError as exc:
        raise ConfigError(f"{where}: backend: {exc}") from None
    if name == experiment.backend:
        return experiment, raw
    return experiment.model_copy(update={"backend": name}), {**raw, "backend": name}


def plan(path: str | Path, settings: Sequence[str] = ()) -> Plan:
    """Load, validate and expand an experiment file (with the user config's defaults and
    `settings`, launcher/job/overrides.py). Raises ConfigError naming key and line."""
    loaded = load_experiment(path, settings)
    experiment, source, raw, lines = loaded.experiment, loaded.path, loaded.data, loaded.lines
    experiment, raw = _canonical_backend(experiment, raw, f"{source}:{lines.get(('backend',), '')}".rstrip(":"))

    grid = experiment.grid
    for key, values in grid.items():
        _check_grid_key(key, str(source), lines.get(("grid", key)))
        if not values:
            line = lines.get(("grid", key))
            raise ConfigError(f"{source}:{line}: grid.{key}: needs at least one value")
        _check_grid_values(key, values, str(source), lines.get(("grid", key)))

    root = Path(experiment.storage.root).expanduser()
    if not root.is_absolute():
        root = (source.parent / root).resolve()

    runs: list[RunConfig] = []
    seen: dict[str, dict] = {}
    keys = list(grid)
    for combo in itertools.product(*(list(enumerate(grid[k])) for k in keys)):
        data = copy.deepcopy(raw)
        data.pop("grid", None)
        overrides = {}
        for key, (_, value) in zip(keys, combo):
            _set_dotted(data, key, value)
            overrides[key] = value
        try:
            resolved = Experiment.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            # Point at the grid value that broke it, not at the section it was merged into.
            for key, (index, value) in zip(keys, combo):
                trial = copy.deepcopy(raw)
                trial.pop("grid", None)
                _set_dotted(trial, key, value)
                try:
                    Experiment.model_validate(trial)
                except ValidationError as single:
                    line = lines.get(("grid", key, index))
                    given = next((f"--set {s}" for s in loaded.settings if s.startswith(f"grid.{key}=")), None)
                    where = given or f"{source}:{line}"  # an axis from --set has no line in the file
                    detail = format_validation_error(single, str(source), lines).split(": ", 2)[-1]
                    raise ConfigError(f"{where}: grid.{key}[{index}] = {value!r}: {detail}") from None
            raise ConfigError(format_validation_error(exc, str(source), lines)) from None
        resolved["grid"] = {}
        try:
            # The loss the job will train with, by the data's format where it is known here.
            resolved["train"]["completion_only_loss"] = resolve_for_plan(
                DatasetConfig.model_validate(resolved["dataset"]),
                TrainConfig.model_validate(resolved["train"]),
                source.parent,
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        overrides = {key: _get_dotted(resolved, key) for key in keys}
        run_id = run_id_for(resolved)
        if run_id in seen:
            raise ConfigError(
                f"{source}: grid: two grid points resolve to the same run ({overrides} and "
                f"{seen[run_id]}); remove the duplicate value"
            )
        seen[run_id] = overrides
        runs.append(
            RunConfig.model_validate(
                {
                    **resolved,
                    "run_id": run_id,
                    "run_dir": str(root / experiment.name / run_id),
                    "overrides": overrides,
                    "experiment_dir": str(source.parent),
                }
            )
        )
    _refuse_recipe_problems(runs, grid, lines, str(source))
    return Plan(
        experiment=experiment,
        source=source,
        storage_root=root,
        runs=tuple(runs),
        key_lines=lines,
        settings=loaded.settings,
        user_defaults=loaded.user_defaults,
    )
