"""Which tokens the loss is computed on: the whole text, or the answers only.

`train.completion_only_loss` (trl's name; Axolotl calls the opposite `train_on_inputs`):
  null   the default by data format: answer-only for `instruction` and `messages` data (as Axolotl,
         LLaMA-Factory and artidoro/qlora do), the whole text for `format: text` (a ready column has
         no prompt to tell apart: the notebook's guanaco case);
  true   answer-only: the prompt (system prompt, instruction, earlier turns) is context, not target;
  false  the whole rendered text, prompt included.

The format is known when the experiment is planned if `dataset.format` says it, or if the dataset
is a local file whose columns can be read here; only `auto` on a hub dataset is left for the job.

Pure: the launcher resolves it at plan time (the run id records it) and the job at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .config import DatasetConfig, TrainConfig
from .data_files import LOCAL_FORMATS, read_rows
from .errors import ConfigError
from .run_checks import auto_format

ANSWER_ONLY_FORMATS = ("instruction", "messages")


def format_from_columns(ds: DatasetConfig, columns: Iterable[str]) -> str | None:
    """What `dataset.format: auto` picks for these columns (None: none of the known shapes)."""
    return auto_format(ds, columns)


def answer_only(train: TrainConfig, fmt: str) -> bool:
    """The effective setting for a dataset of this (detected) format."""
    if train.completion_only_loss is None:
        return fmt in ANSWER_ONLY_FORMATS
    if train.completion_only_loss and fmt not in ANSWER_ONLY_FORMATS:
        raise ConfigError(
            f"train.completion_only_loss: true needs instruction or messages data, but the dataset is in "
            f"the {fmt!r} format (a ready text column has no prompt to leave out of the loss)"
        )
    return train.completion_only_loss


def planned_format(ds: DatasetConfig, experiment_dir: Path) -> str | None:
    """The dataset's format as far as it can be known without loading it (None: the job decides)."""
    if ds.format != "auto":
        return ds.format
    path = Path(ds.path).expanduser()
    path = path if path.is_absolute() else experiment_dir / path
    try:
        columns = _local_columns(path)
    except (OSError, ValueError, ImportError):
        return None  # unreadable here: the job reads it and reports what is wrong
    return format_from_columns(ds, columns) if columns is not None else None


def resolve_for_plan(ds: DatasetConfig, train: TrainConfig, experiment_dir: Path) -> bool | None:
    """train.completion_only_loss as the job will apply it, or None where only the job can tell."""
    fmt = planned_format(ds, experiment_dir)
    if fmt is None:
        return train.completion_only_loss
    return answer_only(train, fmt)


def _local_columns(path: Path) -> list[str] | None:
    if not path.is_file() or path.suffix.lower() not in LOCAL_FORMATS:
        return None
    rows = read_rows(path, limit=1000)  # the fields of the first rows are the columns
    return rows.fields if rows.fields and not rows.error else None
