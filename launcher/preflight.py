"""Pre-flight memory check: will each run of a grid fit on its target GPU?

The estimate follows what a QLoRA step keeps on the GPU with the project's trainer (bitsandbytes
4-bit base, peft LoRA, trl SFTTrainer with its chunked LM-head loss, SDPA attention):

    weights      4-bit linear layers (+ block scales), embeddings and LM head in the compute dtype
    lora         adapter weights and their gradients (fp32)
    optimizer    Adam moments; bitsandbytes' *paged* optimizers keep them in CUDA managed memory,
                 outside PyTorch's pool, where they spill to host memory when the GPU is full
    activations  tokens per micro-batch × bytes per token, which depends on the checkpointing mode
    attention    the packed-sequence mask (SDPA has no varlen kernel on a T4)
    overhead     cuBLAS workspaces, dequantised weight tiles, allocator rounding and fragmentation

`estimated_peak_bytes` predicts PyTorch's `max_memory_reserved()`; it was calibrated on measured
peaks of Llama-2-7B shapes (bench/RESULTS.md). It uses the worst case the config allows (a
micro-batch of `per_device_train_batch_size` sequences of `max_seq_length` tokens), so a dataset of
short examples uses less.

No torch here: this runs on login nodes and laptops before anything is submitted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from .job.config import PADDING_FREE_MAX_ROW, RunConfig

GiB = 1024**3
MiB = 1024**2

# trl's SFTConfig.max_length default: what a run with max_seq_length: null truncates to.
TRL_DEFAULT_MAX_LENGTH = 1024


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden_size * self.num_kv_heads // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block, by peft module name."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.linear_params + self.other_params


# Known architectures, matched against model.name_or_path (case-insensitive, first match wins).
KNOWN_MODELS: list[tuple[str, ModelShape]] = [
    (r"llama-?2-?70b", ModelShape(32000, 8192, 28672, 80, 64, 8)),
    (r"llama-?2-?13b", ModelShape(32000, 5120, 13824, 40, 40, 40)),
    (r"llama-?2-?7b", ModelShape(32000, 4096, 11008, 32, 32, 32)),
    (r"(meta-)?llama-?3(\.1)?-?8b", ModelShape(128256, 4096, 14336, 32, 32, 8)),
    (r"mistral-7b", ModelShape(32000, 4096, 14336, 32, 32, 8)),
    (r"tinyllama", ModelShape(32000, 2048, 5632, 22, 32, 4)),
    (r"smollm2?-1\.7b", ModelShape(49152, 2048, 8192, 24, 32, 32, True)),
    (r"smollm2?-360m", ModelShape(49152, 960, 2560, 32, 15, 5, True)),
    (r"smollm2?-135m", ModelShape(49152, 576, 1536, 30, 9, 3, True)),
]

# What the GPU reports as its memory, by resources.gpu_type (normalised: lower case, no
# "nvidia-"/"tesla-" prefix, "_" as "-").
GPU_MEMORY: dict[str, int] = {
    "t4": 15360 * MiB,
    "v100": 16160 * MiB,
    "v100-16gb": 16160 * MiB,
    "v100-32gb": 32510 * MiB,
    "l4": 23034 * MiB,
    "a10": 23028 * MiB,
    "a10g": 23028 * MiB,
    "rtx3090": 24576 * MiB,
    "rtx4090": 24564 * MiB,
    "a6000": 49140 * MiB,
    "l40s": 46068 * MiB,
    "a100": 40960 * MiB,
    "a100-40gb": 40960 * MiB,
    "a100-80gb": 81920 * MiB,
    "h100": 81559 * MiB,
    "h100-80gb": 81559 * MiB,
    "h200": 143771 * MiB,
}
# GPUs without bfloat16 arithmetic (compute capability < 8.0).
NO_BF16 = {"t4", "v100", "v100-16gb", "v100-32gb"}
# The CUDA context, cuBLAS/cuDNN handles and kernels loaded by torch, bitsandbytes and triton sit
# outside PyTorch's pool.
CUDA_CONTEXT_BYTES = 600 * MiB

# Bytes kept per token, as multiples of the hidden (H) and intermediate (I) sizes, fitted to peaks
# measured with Llama-2-7B shapes on an H100 (bench/RESULTS.md). A decoder layer with nothing
# recomputed keeps LAYER_H × H + LAYER_I × I bytes per token (norm outputs, q/k/v and their rotary
# copies, the attention output, the SwiGLU inputs), plus each adapted input again for LoRA
# dropout; full checkpointing keeps each layer's input (2H) and recomputes one layer at a time in
# the backward pass; selective checkpointing (trl's) also keeps the attention output.
LAYER_H = 22
LAYER_I = 4
BACKWARD_H = 4  # gradient buffers of the layer being back-propagated
BACKWARD_I = 3
HEAD_H = 4  # the fused LM head's gathered hidden states and their gradient
# LoRA keeps its A projection's input for the A gradient, per adapted input feature: the adapters
# are fp32 (fp16 runs keep them so; peft casts the input to their dtype), so under autocast the
# input is saved as the fp16 copy the matmul makes (2 bytes), without mixed precision as the fp32
# one (4); lora.dropout > 0 adds its mask (1 byte). Liger's kernels do not touch these.
LORA_INPUT_BYTES_HALF = 2
LORA_INPUT_BYTES_FP32 = 4
LORA_DROPOUT_MASK_BYTES = 1
# PyTorch's caching allocator reserves more than it hands out: a fixed part (cuBLAS workspaces,
# dequantised weight tiles) and a part that grows with the activation blocks it recycles.
FIXED_OVERHEAD_BYTES = 450 * MiB
ACTIVATION_OVERHEAD = 0.20
# The lean levers (examples/profiles/t4-lean.yaml), fitted on one H200 run of 7B and 13B shapes
# (bench/RESULTS.md, 2026-12-02): each was measured alone against the same t4 baseline.
#   Liger's fused RMSNorm/RoPE/SwiGLU keep fewer fp32 temporaries in the layer being recomputed.
LIGER_LAYER_FACTOR = 0.6
#   trl's activation offloading moves each checkpointed layer input to CPU memory; up to five
#   stay on the GPU (its forward stash), and the blocks brought back on its side stream form a
#   pool of their own, about nine layer inputs, which replaces the allocator slack when larger.
OFFLOAD_STASH_LAYERS = 5
OFFLOAD_POOL_LAYERS = 9
#   Expandable segments grow allocations in place: almost no reserved-but-unused memory.
EXPANDABLE_OVERHEAD = 0.02


@dataclass
class RunEstimate:
    run_id: str
    gpu_type: str
    estimated_peak_bytes: int  # predicted torch.cuda.max_memory_reserved()
    capacity_bytes: int  # the GPU's memory less the CUDA context (0: unknown GPU)
    fits: bool
    breakdown: dict[str, int] = field(default_factory=dict)
    advice: str = ""
    tokens_per_step: int = 0  # tokens in one micro-batch, padding included (worst case)
    paged_bytes: int = 0  # paged optimizer state, outside PyTorch's pool
    checked: bool = True  # False when the model or GPU is unknown: nothing was refused

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.estimated_peak_bytes


# ---------------------------------------------------------------------------------------------
# Inputs


def normalise_gpu(gpu_type: str) -> str:
    name = gpu_type.strip().lower().replace("_", "-")
    for prefix in ("nvidia-", "tesla-"):
        name = name.removeprefix(prefix)
    return {"a100-40g": "a100-40gb", "a100-80g": "a100-80gb", "h100-80g": "h100-80gb"}.get(name, name)


def gpu_capacity(gpu_type: str) -> int | None:
    """Bytes PyTorch can use on this GPU type, or None when unknown."""
    total = GPU_MEMORY.get(normalise_gpu(gpu_type))
    return None if total is None else total - CUDA_CONTEXT_BYTES


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    return ModelShape(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


def model_shape(run: RunConfig) -> ModelShape | None:
    """The architecture of the run's base model: a local config.json first, then the known table."""
    name = run.model.name_or_path
    for folder in (Path(name).expanduser(), run.resolve_path(name)):
        config_file = folder / "config.json"
        if config_file.is_file():
            try:
                return shape_from_config(json.loads(config_file.read_text()))
            except (ValueError, KeyError, TypeError):
                return None
    lowered = name.lower()
    for pattern, shape in KNOWN_MODELS:
        if re.search(pattern, lowered):
            return shape
    return None


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch looks like on the GPU."""

    tokens: int  # tokens in the micro-batch, padding included
    row_length: int  # longest row attention runs over
    rows: int
    packed: bool  # several examples per row, separated by a block-diagonal mask
    flattened: bool = False  # unpacked examples concatenated into one row (train.padding_free)


def step_shape(run: RunConfig) -> StepShape:
    train = run.train
    extra = train.sft_args
    max_length = extra.get("max_length", train.max_seq_length) or TRL_DEFAULT_MAX_LENGTH
    batch = int(extra.get("per_device_train_batch_size", train.per_device_train_batch_size))
    packing = bool(extra.get("packing", train.packing))
    padding_free = bool(extra.get("padding_free", False)) or (
        packing and extra.get("packing_strategy", "bfd") in ("bfd", "bfd_split")
    )
    if not packing and "padding_free" not in extra:
        # train.padding_free (auto: on from two examples per micro-batch), training/levers.py
        setting = train.padding_free
        padding_free = setting is True or (
            setting == "auto" and 1 < batch and batch * max_length <= PADDING_FREE_MAX_ROW
        )
    if padding_free and not packing:
        # trl's padding-free collator concatenates the micro-batch into one row.
        return StepShape(batch * max_length, batch * max_length, 1, True, flattened=True)
    if padding_free:
        # The trainer keeps packed rows apart (training/packing.py) unless the model runs
        # FlashAttention-2, whose varlen kernel needs no mask; rows are what a T4 gets.
        return StepShape(batch * max_length, max_length, batch, True)
    return StepShape(batch * max_length, max_length, batch, packing)


def checkpointing_mode(run: RunConfig) -> str:
    if not run.train.sft_args.get("gradient_checkpointing", run.train.gradient_checkpointing):
        return "none"
    kwargs = run.train.sft_args.get("gradient_checkpointing_kwargs") or {}
    selective = run.train.gradient_checkpointing == "selective" or kwargs.get("selective")
    return "selective" if selective else "full"


def lora_targets(run: RunConfig, shape: ModelShape) -> list[str]:
    targets = run.lora.target_modules
    names = list(shape.linear_shapes())
    if targets is None:
        return ["q_proj", "v_proj"]  # peft's default for Llama-architecture models
    if isinstance(targets, str):
        if targets == "all-linear":
            return names
        return [name for name in names if re.fullmatch(targets, name)]
    return [name for name in names if name in targets]


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate_run(run: RunConfig) -> RunEstimate:
    gpu = run.resources.gpu_type
    step = step_shape(run)
    if run.resources.gpus_per_node == 0:
        return RunEstimate(
            run.run_id,
            "none",
            0,
            0,
            fits=True,
            tokens_per_step=step.tokens,
            checked=False,
            advice="no GPU requested (resources.gpus_per_node: 0): nothing to check",
        )
    capacity = gpu_capacity(gpu)
    shape = model_shape(run)
    problems = _precision_problems(run)
    if shape is None:
        return RunEstimate(
            run.run_id,
            gpu,
            0,
            capacity or 0,
            fits=not problems,
            tokens_per_step=step.tokens,
            checked=False,
            advice="; ".join(problems)
            or f"model {run.model.name_or_path!r} is not in the shape table and "
            "has no local config.json: memory not checked",
        )
    breakdown, paged = memory_breakdown(run, shape, step)
    peak = sum(breakdown.values())
    if capacity is None:
        return RunEstimate(
            run.run_id,
            gpu,
            peak,
            0,
            fits=not problems,
            breakdown=breakdown,
            tokens_per_step=step.tokens,
            paged_bytes=paged,
            checked=False,
            advice="; ".join(problems)
            or f"unknown resources.gpu_type {gpu!r} (known: {', '.join(sorted(GPU_MEMORY))}): memory not checked",
        )
    fits = peak <= capacity
    advice = list(problems)
    if not fits:
        advice.append(_advice(run, shape, step, capacity, peak))
    elif peak + paged > capacity:
        advice.append(f"the paged optimizer state ({_gib(paged)}) will partly live in host memory: slower steps")
    return RunEstimate(
        run.run_id,
        gpu,
        peak,
        capacity,
        fits=fits and not problems,
        breakdown=breakdown,
        advice="; ".join(advice),
        tokens_per_step=step.tokens,
        paged_bytes=paged,
    )


def memory_breakdown(run: RunConfig, shape: ModelShape, step: StepShape) -> tuple[dict[str, int], int]:
    """Bytes by component (summing to the PyTorch peak), and the paged optimizer bytes beside it."""
    quant = run.quantization
    compute_bytes = 4 if quant.bnb_4bit_compute_dtype == "float32" else 2
    if quant.load_in_4bit:
        # NF4/FP4: half a byte per weight, plus one fp32 scale per 64 weights (double quantisation
        # stores those as 8 bits with an fp32 scale per 256 blocks).
        scale_bytes = (1 + 4 / 256) / 64 if quant.bnb_4bit_use_double_quant else 4 / 64
        linear = shape.linear_params * (0.5 + scale_bytes)
    else:
        linear = shape.linear_params * compute_bytes
    weights = int(linear + shape.other_params * compute_bytes)

    targets = lora_targets(run, shape)
    layer_shapes = shape.linear_shapes()
    lora_params = shape.num_layers * sum(run.lora.r * (layer_shapes[t][0] + layer_shapes[t][1]) for t in targets)
    adapter_bytes = 2 if run.train.bf16 else 4  # trl keeps bf16 adapters in bf16
    lora = lora_params * adapter_bytes * 2  # weights + gradients

    optim = str(run.train.sft_args.get("optim", run.train.optim)).lower()
    state_per_param = 0 if "sgd" in optim else 2 if "8bit" in optim else 8
    optimizer = lora_params * state_per_param
    paged = optimizer if "paged" in optim else 0

    activations = step.tokens * _activation_bytes_per_token(run, shape, targets, compute_bytes)
    attention = 0
    if step.packed:
        # The block-diagonal mask SDPA receives: one boolean and one additive fp16 copy.
        attention = step.rows * step.row_length * step.row_length * (1 + compute_bytes)

    breakdown = {
        "weights": weights,
        "lora": lora,
        "optimizer": optimizer - paged,
        "activations": activations,
        "attention mask": attention,
    }
    slack = (EXPANDABLE_OVERHEAD if run.train.expandable_segments else ACTIVATION_OVERHEAD) * (activations + attention)
    if _offloading_mode(run) == "streams":
        layer_input = step.tokens * 2 * shape.hidden_size * compute_bytes / 2
        slack = max(slack, OFFLOAD_POOL_LAYERS * layer_input)
    breakdown["overhead"] = int(FIXED_OVERHEAD_BYTES + slack)
    return breakdown, paged


def _offloading(run: RunConfig) -> bool:
    return _offloading_mode(run) is not None


def _offloading_mode(run: RunConfig) -> str | None:
    """None, "streams" (trl's default) or "sync" (train.activation_offloading: sync)."""
    value = run.train.sft_args.get("activation_offloading", run.train.activation_offloading)
    return "sync" if value == "sync" else "streams" if value else None


def _liger(run: RunConfig) -> bool:
    """`true`, and `auto` (the default) on a GPU Triton supports: every known resources.gpu_type
    (compute capability >= 7.0). `auto` also needs liger-kernel where the job runs (the `fast`
    extra, which the bench and the profiles' measurements had); a job without it says so in its
    log and needs the memory of `use_liger_kernel: false`."""
    value = run.train.sft_args.get("use_liger_kernel", run.train.use_liger_kernel)
    return value is True or (value == "auto" and normalise_gpu(run.resources.gpu_type) in GPU_MEMORY)


def _activation_bytes_per_token(run: RunConfig, shape: ModelShape, targets: list[str], compute_bytes: int) -> float:
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    scale = compute_bytes / 2  # coefficients are for fp16 activations
    lora_inputs = sum(shape.linear_shapes()[t][0] for t in targets)
    half = run.train.fp16 or run.train.bf16 or bool(run.train.sft_args.get("fp16") or run.train.sft_args.get("bf16"))
    lora_bytes = (LORA_INPUT_BYTES_HALF if half else LORA_INPUT_BYTES_FP32) + (
        LORA_DROPOUT_MASK_BYTES if run.lora.dropout > 0 else 0
    )
    saved_layer = (LAYER_H * h + LAYER_I * i) * scale
    backward_layer = (BACKWARD_H * h + BACKWARD_I * i) * scale
    if _liger(run):
        saved_layer, backward_layer = LIGER_LAYER_FACTOR * saved_layer, LIGER_LAYER_FACTOR * backward_layer
    saved_layer += lora_bytes * lora_inputs
    head = HEAD_H * h * scale
    mode = checkpointing_mode(run)
    offload = _offloading_mode(run)
    kept_layers = {"sync": 1, "streams": min(layers, OFFLOAD_STASH_LAYERS)}.get(offload, layers)
    if mode == "none":
        return kept_layers * saved_layer + backward_layer + head
    kept = 2 * h * scale if mode == "full" else 4 * h * scale  # layer input (+ attention output)
    return kept_layers * kept + saved_layer + backward_layer + head


def _precision_problems(run: RunConfig) -> list[str]:
    if normalise_gpu(run.resources.gpu_type) not in NO_BF16:
        return []
    problems = []
    if run.train.bf16:
        problems.append(f"a {run.resources.gpu_type} has no bfloat16: set train.fp16: true instead of train.bf16")
    if run.quantization.bnb_4bit_compute_dtype == "bfloat16":
        problems.append(f"a {run.resources.gpu_type} has no bfloat16: set quantization.bnb_4bit_compute_dtype: float16")
    return problems


def _with_train(run: RunConfig, **changes: Any) -> RunConfig:
    return run.model_copy(update={"train": run.train.model_copy(update=changes)})


def _peak(run: RunConfig, shape: ModelShape) -> int:
    breakdown, _ = memory_breakdown(run, shape, step_shape(run))
    return sum(breakdown.values())


def _with_checkpointing(run: RunConfig) -> RunConfig:
    sft_args = {
        k: v
        for k, v in run.train.sft_args.items()
        if k not in ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    }
    return _with_train(run, gradient_checkpointing=True, sft_args=sft_args)


def _advice(run: RunConfig, shape: ModelShape, step: StepShape, capacity: int, peak: int) -> str:
    """The first knob (or pair of knobs) that makes the run fit, with the value to set."""
    over = f"needs ~{_gib(peak)} of {_gib(capacity)}"
    fixed = _peak(_with_train(run, per_device_train_batch_size=1, max_seq_length=8), shape)
    if fixed > capacity:
        return (
            f"{over}: the model alone ({_gib(fixed)}) does not fit a {run.resources.gpu_type}; "
            "pick a larger resources.gpu_type (or a smaller model / lower lora.r)"
        )
    lean = _lean_advice(run, shape, capacity, over)
    if lean:
        return lean
    prefix = ""
    if checkpointing_mode(run) != "full":
        checkpointed = _with_checkpointing(run)
        if _peak(checkpointed, shape) <= capacity:
            return f"{over}: set train.gradient_checkpointing: true (~{_gib(_peak(checkpointed, shape))})"
        run, prefix = checkpointed, "set train.gradient_checkpointing: true and "
    batch = run.train.per_device_train_batch_size
    for smaller in range(batch - 1, 0, -1):
        if _peak(_with_train(run, per_device_train_batch_size=smaller), shape) <= capacity:
            accumulation = run.train.gradient_accumulation_steps * math.ceil(batch / smaller)
            return (
                f"{over}: {prefix}lower train.per_device_train_batch_size to {smaller} (and raise "
                f"train.gradient_accumulation_steps to {accumulation} to keep the batch)"
            )
    candidate = step.tokens // max(1, batch)
    while candidate > 64:
        candidate = candidate * 3 // 4 // 64 * 64
        trial = _with_train(run, per_device_train_batch_size=1, max_seq_length=max(candidate, 8))
        if "max_length" in run.train.sft_args:
            trial = _with_train(trial, sft_args={**run.train.sft_args, "max_length": max(candidate, 8)})
        if _peak(trial, shape) <= capacity:
            return (
                f"{over}: {prefix}set train.per_device_train_batch_size: 1 and lower "
                f"train.max_seq_length to {candidate}"
            )
    return f"{over}: pick a larger resources.gpu_type"


# The lean levers, smallest change first: none of them changes the math (same loss per step).
LEAN_LEVERS: list[dict[str, Any]] = [
    {"expandable_segments": True},
    {"use_liger_kernel": True},
    {"use_liger_kernel": True, "expandable_segments": True},
    {"activation_offloading": True},
    {"activation_offloading": True, "expandable_segments": True},
    {"activation_offloading": True, "use_liger_kernel": True, "expandable_segments": True},
    {"activation_offloading": "sync", "use_liger_kernel": True, "expandable_segments": True},
]


def _lean_advice(run: RunConfig, shape: ModelShape, capacity: int, over: str) -> str:
    """The fewest lean levers (examples/profiles/t4-lean.yaml) that make the run fit, if any."""
    lean_keys = ("activation_offloading", "use_liger_kernel", "expandable_segments")
    if any(key in run.train.sft_args for key in lean_keys):
        return ""
    for levers in LEAN_LEVERS:
        changes = {key: value for key, value in levers.items() if getattr(run.train, key) != value}
        if not changes:
            continue  # already on
        peak = _peak(_with_train(run, **changes), shape)
        if peak <= capacity:
            keys = ", ".join(f"train.{key}: {str(value).lower()}" for key, value in changes.items())
            name = " (the t4-lean profile)" if len(levers) == 3 else ""
            return f"{over}; with {keys}{name} ~{_gib(peak)}, same math"
    return ""


# ---------------------------------------------------------------------------------------------
# Public API


# The grid evaluation job (issue #29): answers per generate call when inference.batch_size is auto
# (the per-run job's batch; the job itself grows it while the GPU's free memory allows).
EVALUATION_AUTO_ROWS = 8


def estimate_evaluation(runs: list[RunConfig]) -> RunEstimate | None:
    """The grid evaluation job's GPU memory: the base model once (4-bit unless
    inference.load_in_4bit is false), every run's adapter (fp32, as peft attaches them), and the
    key/value cache and logits of one batch of answers (inference.batch_size rows, or 8 for auto)
    at the worst-case prompt (max_seq_length, else trl's 1024) plus max_new_tokens. None: no run
    of the grid is evaluated by that job."""
    if not runs:
        return None
    first = runs[0]
    label = f"evaluation ({len(runs)} runs)"
    resources = _inference_resources(first)
    if resources.gpus_per_node == 0:
        return RunEstimate(
            label,
            "none",
            0,
            0,
            fits=True,
            checked=False,
            advice="inference.resources.gpus_per_node: 0: answers on CPU, nothing to check",
        )
    capacity, shape = gpu_capacity(resources.gpu_type), model_shape(first)
    if shape is None or capacity is None:
        return RunEstimate(
            label,
            resources.gpu_type,
            0,
            capacity or 0,
            fits=True,
            checked=False,
            advice="model or GPU not in the tables: evaluation memory not checked",
        )
    compute = 2
    linear = shape.linear_params * ((0.5 + 4 / 64) if first.inference.load_in_4bit else compute)
    weights = int(linear + shape.other_params * compute)
    layers = shape.linear_shapes()
    adapters = sum(
        shape.num_layers * sum(run.lora.r * sum(layers[t]) for t in lora_targets(run, shape)) * 4 for run in runs
    )
    rows = min(run.inference.rows(EVALUATION_AUTO_ROWS) for run in runs)
    length = max((run.train.max_seq_length or TRL_DEFAULT_MAX_LENGTH) + run.inference.max_new_tokens for run in runs)
    cache = rows * length * 2 * shape.num_layers * shape.kv_dim * compute
    logits = rows * shape.vocab_size * 4
    breakdown = {"weights": weights, "lora": adapters, "activations": cache + logits, "overhead": FIXED_OVERHEAD_BYTES}
    peak = sum(breakdown.values())
    fits = peak <= capacity
    advice = ""
    if not fits:
        fixed = weights + adapters + FIXED_OVERHEAD_BYTES
        per_row = length * 2 * shape.num_layers * shape.kv_dim * compute + shape.vocab_size * 4
        room = (capacity - fixed) // per_row if capacity > fixed else 0
        advice = f"the grid evaluation job needs {_gib(peak)} on {resources.gpu_type} ({_gib(capacity)}): " + (
            f"set inference.batch_size: {room} or less"
            if room >= 1
            else "its base model and adapters alone do not fit: evaluate fewer runs per job "
            "(inference.per_run: true) or use a larger GPU"
        )
    return RunEstimate(
        label,
        resources.gpu_type,
        peak,
        capacity,
        fits=fits,
        breakdown=breakdown,
        advice=advice,
        tokens_per_step=rows * length,
    )


def _inference_resources(run: RunConfig):
    from .jobspec import inference_resources

    return inference_resources(run)


def preflight(plan: Any) -> list[RunEstimate]:
    """One estimate per run of a `launcher.grid.Plan` (or any iterable of RunConfig)."""
    runs: Iterable[RunConfig] = getattr(plan, "runs", plan)
    return [estimate_run(run) for run in runs]


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"


def format_table(estimates: list[RunEstimate]) -> Table:
    table = Table(title="pre-flight: peak GPU memory per run in GiB (worst-case micro-batch)")
    for column in ("run", "gpu", "tokens", "weights", "LoRA+opt", "activ.", "peak", "of", "fits", "advice"):
        table.add_column(
            column,
            justify="left" if column in ("run", "gpu", "fits", "advice") else "right",
            no_wrap=column in ("run", "gpu"),
            min_width=10 if column == "run" else None,
        )
    for e in estimates:
        b = e.breakdown
        if not e.breakdown:
            numbers = ["?"] * 5
        else:
            numbers = [
                _num(b.get("weights", 0)),
                _num(b.get("lora", 0) + b.get("optimizer", 0) + e.paged_bytes),
                _num(b.get("activations", 0) + b.get("attention mask", 0)),
                _num(e.estimated_peak_bytes),
                _num(e.capacity_bytes) if e.capacity_bytes else "?",
            ]
        verdict = "[green]yes[/]" if e.fits and e.checked else "[yellow]unchecked[/]" if e.fits else "[red]no[/]"
        table.add_row(e.run_id, e.gpu_type, f"{e.tokens_per_step:,}", *numbers, verdict, e.advice)
    return table


def _num(value: int) -> str:
    return f"{value / GiB:.1f}"
