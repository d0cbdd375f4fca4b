"""The README's experiment-file reference is a valid experiment that shows every key."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from launcher.job.config import Experiment
from launcher.job.experiment_file import load_yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def reference_block() -> str:
    text = README.read_text()
    section = text.split("## The experiment file", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_reference_is_a_valid_experiment_with_the_defaults():
    data = load_yaml(reference_block())
    experiment = Experiment.model_validate(data)
    defaults = Experiment(name=experiment.name)
    for section in (
        "model",
        "dataset",
        "prompt",
        "quantization",
        "lora",
        "train",
        "resources",
        "inference",
        "environment",
        "local",
        "slurm",
        "kubernetes",
    ):
        assert getattr(experiment, section) == getattr(defaults, section), f"{section}: README shows non-defaults"


def test_reference_shows_every_key():
    data = load_yaml(reference_block())
    for name, field in Experiment.model_fields.items():
        if name == "description":
            continue
        assert name in data, f"README reference lacks top-level key {name!r}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing = set(annotation.model_fields) - set(data[name])
            assert not missing, f"README reference lacks {name}.{sorted(missing)}"
