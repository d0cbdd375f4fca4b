"""The profiles the throughput bench compares: each is a set of experiment-file values.

`notebook` is the Llama-2 QLoRA Colab recipe users copy (batch 4 padded to the longest example, no
packing, gradient checkpointing, LoRA r=64 on q/v, 4-bit NF4 with fp16 compute), without Liger
(the notebook has none) and with padded batches (`padding_free: false`). `notebook+liger` is what
an experiment file without a profile got before padding-free batches (Liger `auto`, padded);
`default` is what it gets now: the same recipe with `padding_free: auto` and Liger `auto`. `t4` is examples/profiles/t4-fast.yaml with Liger off, the baseline the
levers are measured against one at a time; `t4+liger` is t4-fast.yaml as users get it on a GPU
with liger-kernel installed (auto → on). `t4-lean` is examples/profiles/t4-lean.yaml.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from launcher.job.experiment_file import load_yaml

ROOT = Path(__file__).resolve().parents[1]
T4_PROFILE_FILE = ROOT / "examples" / "profiles" / "t4-fast.yaml"
LEAN_PROFILE_FILE = ROOT / "examples" / "profiles" / "t4-lean.yaml"
# What a profile may set: the sections that define the training recipe.
RECIPE_SECTIONS = ("quantization", "lora", "train")


def profile_file(path: Path = T4_PROFILE_FILE) -> dict[str, Any]:
    data = load_yaml(path.read_text())
    return {section: data[section] for section in RECIPE_SECTIONS if section in data}


def t4_profile() -> dict[str, Any]:
    return profile_file(T4_PROFILE_FILE)


def merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


def profiles() -> dict[str, tuple[str, dict[str, Any]]]:
    """name → (what it changes, recipe sections)."""
    t4 = merged(t4_profile(), train={"use_liger_kernel": False})
    lean = profile_file(LEAN_PROFILE_FILE)
    notebook: dict[str, Any] = {"train": {"use_liger_kernel": False, "padding_free": False}}
    fast_all = merged(t4_profile(), lora={"target_modules": "all-linear"})
    lean_all = merged(lean, lora={"target_modules": "all-linear"})
    budget = t4["train"]["per_device_train_batch_size"] * t4["train"]["max_seq_length"]
    return {
        "notebook": ("the notebook recipe (the experiment model's defaults)", notebook),
        "notebook+liger": (
            "the defaults before padding-free batches: notebook + Liger auto, padded",
            merged(notebook, train={"use_liger_kernel": "auto"}),
        ),
        "default-noliger": (
            "no profile, Liger off: padding-free batches only (same examples and loss per step)",
            {"train": {"use_liger_kernel": False}},
        ),
        "default": ("no profile at all: the defaults (padding_free auto + use_liger_kernel auto)", {}),
        "t4-fast+all-linear": ("t4-fast.yaml with LoRA on all 7 linear layers", fast_all),
        "t4-fast+all-linear+dropout0": (
            "t4-fast + all-linear, lora.dropout 0 (peft skips the dropout)",
            merged(fast_all, lora={"dropout": 0.0}),
        ),
        "t4-fast+all-linear+dq": (
            "t4-fast + all-linear + double quantisation",
            merged(fast_all, quantization={"bnb_4bit_use_double_quant": True}),
        ),
        "t4-lean+all-linear": ("t4-lean.yaml with LoRA on all 7 linear layers", lean_all),
        "t4-lean+all-linear+dropout0": (
            "t4-lean + all-linear, lora.dropout 0",
            merged(lean_all, lora={"dropout": 0.0}),
        ),
        "notebook+fp16": ("notebook + fp16 mixed precision (train.fp16)", merged(notebook, train={"fp16": True})),
        "notebook+fp16+packed": (
            "+ packed rows, per-example attention, same 4×1024 tokens per step",
            merged(notebook, train={"fp16": True, "packing": True, "max_seq_length": 1024, "group_by_length": False}),
        ),
        "t4": (f"examples/profiles/t4-fast.yaml without Liger: packed rows, {budget} tokens per step", t4),
        "t4+liger": (
            "t4 + Liger kernels (RMSNorm, RoPE, SwiGLU) = t4-fast.yaml with the default auto",
            merged(t4, train={"use_liger_kernel": True}),
        ),
        "t4-fast": ("examples/profiles/t4-fast.yaml exactly as users get it (use_liger_kernel: auto)", t4_profile()),
        "t4+sac": (
            "t4 + trl's selective checkpointing: attention output kept, not recomputed "
            "(train.gradient_checkpointing: selective)",
            merged(t4, train={"gradient_checkpointing": "selective"}),
        ),
        "t4+liger+sac": (
            "t4 + Liger + selective checkpointing",
            merged(t4, train={"use_liger_kernel": True, "gradient_checkpointing": "selective"}),
        ),
        "t4+offload": (
            "t4 + trl activation offloading (train.activation_offloading)",
            merged(t4, train={"activation_offloading": True}),
        ),
        "t4+expandable": (
            "t4 + PyTorch expandable segments (train.expandable_segments)",
            merged(t4, train={"expandable_segments": True}),
        ),
        "t4-lean": ("examples/profiles/t4-lean.yaml: t4 + Liger + offloading (sync) + expandable segments", lean),
        "t4-lean-streams": (
            "t4-lean with trl's streamed offloading (activation_offloading: true)",
            merged(lean, train={"activation_offloading": True}),
        ),
        "t4+offload-sync": (
            "t4 + activation offloading on the compute stream (activation_offloading: sync)",
            merged(t4, train={"activation_offloading": "sync"}),
        ),
        "t4-lean-streams-24rows": (
            "t4-lean-streams with 24 packed rows (24576 tokens per step)",
            merged(lean, train={"activation_offloading": True, "per_device_train_batch_size": 24}),
        ),
        "t4-lean-streams-4rows": (
            "t4-lean-streams with 4 packed rows (4096 tokens per step)",
            merged(lean, train={"activation_offloading": True, "per_device_train_batch_size": 4}),
        ),
        "t4+all-linear": ("t4 + LoRA on all linear layers", merged(t4, lora={"target_modules": "all-linear"})),
        "t4+workers": ("t4 + 2 data-loading worker processes", merged(t4, train={"dataloader_num_workers": 2})),
    }
