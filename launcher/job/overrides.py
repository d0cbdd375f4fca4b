"""What changes an experiment besides its file: `--set key=value` and the user config file.

Precedence, lowest first: qlaunch's defaults < the user config file (site defaults such as a
Slurm account or a Kubernetes namespace) < the experiment file < `--set` on the command line.

`--set` takes a dotted key and a YAML value, read like the experiment file reads it
(`train.learning_rate=2e-4` is a float, `lora.target_modules=[q_proj,v_proj]` a list,
`slurm.partition=null` clears it). `grid.<dotted key>=[...]` replaces one grid axis. Errors name
the `--set` they come from.

The user config file is `$QLAUNCH_HOME/config.yaml` (default `~/.qlaunch/config.yaml`, beside
the run index). It may hold only the sections that say where and how jobs run
(`USER_SECTIONS`), never what is trained: the same experiment file must give the same run ids
on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from .config import Experiment
from .errors import ConfigError

# Site and per-user settings only; the identity sections (and storage, inference) stay in the file.
USER_SECTIONS = ("slurm", "kubernetes", "local", "environment", "tracking")


class Setting(NamedTuple):
    """One `--set KEY=VALUE`: the key path as it lands in the experiment mapping, and its value."""

    text: str  # as typed, for error messages
    path: tuple[str, ...]
    value: Any


def user_config_path() -> Path:
    return Path(os.environ.get("QLAUNCH_HOME", "~/.qlaunch")).expanduser() / "config.yaml"


def parse_set(text: str) -> Setting:
    """`train.learning_rate=2e-4` → Setting(path=("train", "learning_rate"), value=0.0002)."""
    from .experiment_file import load_yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set train.learning_rate=2e-4")
    if key.startswith("grid."):
        path: tuple[str, ...] = ("grid", key.removeprefix("grid."))  # a grid axis is one dotted key
    else:
        path = tuple(key.split("."))
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except Exception as exc:  # yaml.YAMLError; the message names the --set
        raise ConfigError(f"--set {text}: the value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    _check_path(text, path)
    return Setting(text, path, value)


def _check_path(text: str, path: tuple[str, ...]) -> None:
    """Every part of the key names a field (a dict-valued field such as train.sft_args takes any sub-key)."""
    if path[0] == "grid":
        if len(path) == 1:
            raise ConfigError(f"--set {text}: name one grid axis, e.g. --set grid.lora.r=[8,16]")
        return  # the grid's own check names an unknown axis key
    model: Any = Experiment
    for depth, part in enumerate(path):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return
        if part not in fields:
            import difflib

            where = ".".join(path[:depth]) or "the top level"
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(fields))}"
            raise ConfigError(f"--set {text}: unknown key {part!r} under {where} ({hint})")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def apply_sets(data: dict[str, Any], settings: list[Setting]) -> dict[str, Any]:
    """The experiment mapping with every `--set` applied (a new dict; `data` is not changed)."""
    import copy

    data = copy.deepcopy(data)
    for setting in settings:
        grid = data.get("grid") or {}
        dotted = ".".join(setting.path)
        if setting.path[0] != "grid" and dotted in grid:
            raise ConfigError(
                f"--set {setting.text}: {dotted} is one of the grid's axes (grid.{dotted}); "
                f"--set grid.{dotted}=[...] changes its values"
            )
        node = data
        for part in setting.path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[setting.path[-1]] = setting.value
    return data


def set_labels(settings: list[Setting]) -> dict[tuple, str]:
    """Key path → `--set ...`, so a validation error points at the --set, not the file."""
    return {setting.path: f"--set {setting.text}" for setting in settings}


class UserConfig(NamedTuple):
    path: Path
    sections: dict[str, dict[str, Any]]  # validated, as written (only the keys it sets)


def load_user_config(path: Path | None = None) -> UserConfig | None:
    """The user config file, validated; None when there is none."""
    from .experiment_file import format_validation_error, parse_yaml

    path = path or user_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the user config: {exc.strerror}") from None
    if not text.strip():
        return None
    data, lines = parse_yaml(text, str(path))
    for key, value in data.items():
        if key not in USER_SECTIONS:
            raise ConfigError(
                f"{path}:{lines.get((key,), 1)}: {key}: not a user default (the user config holds "
                f"only {', '.join(USER_SECTIONS)}; what is trained belongs in the experiment file)"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{path}:{lines.get((key,), 1)}: {key}: expected a mapping of keys")
        model = Experiment.model_fields[key].annotation
        try:
            model.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(path), lines, prefix=(key,))) from None
    return UserConfig(path, data)


def apply_user_config(data: dict[str, Any], user: UserConfig | None) -> tuple[dict[str, Any], list[str]]:
    """The experiment mapping with the user's defaults under it (the file wins key by key), and
    the dotted keys that came from the user config."""
    if user is None:
        return data, []
    data = dict(data)
    taken = []
    for section, values in user.sections.items():
        mine = data.get(section)
        merged = dict(mine) if isinstance(mine, dict) else {}
        for key, value in values.items():
            if key not in merged:
                merged[key] = value
                taken.append(f"{section}.{key}")
        if mine is None or isinstance(mine, dict):
            data[section] = merged
    return data, taken
