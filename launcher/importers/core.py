"""What an importer produces: qlaunch keys with their sources, and warnings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..job.config import NAME_PATTERN

# Keys whose qlaunch default (the Llama-2 QLoRA notebook's) is worth a word when a source leaves
# them unset: other tools' defaults differ, so the imported run may not train as the source did.
NOTABLE_DEFAULTS = {
    "train.learning_rate": 2e-4,
    "train.num_train_epochs": 1,
    "train.lr_scheduler_type": "constant",
    "train.optim": "paged_adamw_32bit",
    "train.weight_decay": 0.001,
    "train.max_grad_norm": 0.3,
    "train.warmup_ratio": 0.03,
    "train.group_by_length": True,
    "train.gradient_checkpointing": True,
    "lora.r": 64,
    "lora.alpha": 16,
    "lora.dropout": 0.1,
}


@dataclass(frozen=True)
class Mapped:
    key: str  # dotted qlaunch key
    value: Any
    source: str  # e.g. "lora_target_linear: true"


@dataclass
class Imported:
    tool: str  # "axolotl" | "trl sft.py"
    origin: str  # the file, or the command line
    name: str = "imported"
    mapped: list[Mapped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any, source: str) -> None:
        self.mapped = [m for m in self.mapped if m.key != key]
        self.mapped.append(Mapped(key, value, source))

    def has(self, key: str) -> bool:
        return any(m.key == key for m in self.mapped)

    def get(self, key: str, default: Any = None) -> Any:
        return next((m.value for m in self.mapped if m.key == key), default)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def note_unset_defaults(self) -> None:
        also = {"train.warmup_ratio": "train.sft_args.warmup_steps"}
        unset = [k for k in NOTABLE_DEFAULTS if not self.has(k) and not self.has(also.get(k, k))]
        if self.get("train.max_steps", -1) > 0:
            unset = [k for k in unset if k != "train.num_train_epochs"]  # max_steps decides
        if unset:
            listed = ", ".join(f"{k}: {yaml_scalar(NOTABLE_DEFAULTS[k])}" for k in unset)
            self.warn(f"not set in the source, so qlaunch's defaults apply (check they are what you want): {listed}")

    def as_data(self) -> dict[str, Any]:
        """The mapped keys as a nested experiment dict."""
        data: dict[str, Any] = {"name": self.name}
        for m in self.mapped:
            *parents, leaf = m.key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = m.value
        return data


def experiment_name(text: str, fallback: str = "imported") -> str:
    """A valid experiment name from a file or folder name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    return name if re.fullmatch(NAME_PATTERN, name) else fallback


def yaml_scalar(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text
