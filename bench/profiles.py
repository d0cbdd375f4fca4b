"""The profiles the throughput bench compares: each is a set of experiment-file values.

`notebook` is the experiment model's defaults, which are the Llama-2 QLoRA Colab recipe users copy
(batch 4 padded to the longest example, no packing, gradient checkpointing, LoRA r=64 on q/v,
4-bit NF4 with fp16 compute). `t4` is examples/profiles/t4-fast.yaml as users get it. The others
each change one lever, to measure it alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from launcher.experiment_file import load_yaml

ROOT = Path(__file__).resolve().parents[1]
T4_PROFILE_FILE = ROOT / "examples" / "profiles" / "t4-fast.yaml"
# What a profile may set: the sections that define the training recipe.
RECIPE_SECTIONS = ("quantization", "lora", "train")


def t4_profile() -> dict[str, Any]:
    data = load_yaml(T4_PROFILE_FILE.read_text())
    return {section: data[section] for section in RECIPE_SECTIONS if section in data}


def merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


def profiles() -> dict[str, tuple[str, dict[str, Any]]]:
    """name → (what it changes, recipe sections)."""
    t4 = t4_profile()
    notebook: dict[str, Any] = {}
    budget = t4["train"]["per_device_train_batch_size"] * t4["train"]["max_seq_length"]
    return {
        "notebook": ("the notebook recipe (the experiment model's defaults)", notebook),
        "notebook+fp16": ("notebook + fp16 mixed precision (train.fp16)",
                          merged(notebook, train={"fp16": True})),
        "notebook+fp16+packed": ("+ packed rows, per-example attention, same 4×1024 tokens per step",
                                 merged(notebook, train={"fp16": True, "packing": True,
                                                         "max_seq_length": 1024, "group_by_length": False})),
        "t4": (f"examples/profiles/t4-fast.yaml: packed rows, {budget} tokens per step", t4),
        "t4+liger": ("t4 + Liger kernels (RMSNorm, RoPE, SwiGLU)", merged(t4, train={"use_liger_kernel": True})),
        "t4+all-linear": ("t4 + LoRA on all linear layers", merged(t4, lora={"target_modules": "all-linear"})),
        "t4+workers": ("t4 + 2 data-loading worker processes", merged(t4, train={"dataloader_num_workers": 2})),
    }
