"""How long each run trains, and how many GPU-hours a grid costs, before anything is submitted.

A throughput model of one optimizer step of the project's QLoRA trainer on `resources.gpu_type`:

    step = host + dequant + matmul + lora + unpacked + offload
    host      Python and kernel launches, per decoder layer (does not depend on the GPU)
    dequant   each 4-bit weight is dequantised to fp16 once per pass (forward, recompute,
              backward): read 4.5 bits, write and read 2 bytes, at the GPU's memory bandwidth
    matmul    FLOPs per token (2·N per pass over the linear layers, the LM head, attention over
              each row) over the GPU's dense fp16 peak × an efficiency fitted on H100 runs (it
              also absorbs the elementwise work between the matmuls, which Liger fuses)
    lora      the adapters' memory-bound work, per adapted feature and token
    unpacked  padded batches change shape every step (new Triton/cuBLAS specialisations)
    offload   the part of the activation copies to CPU memory the side stream does not hide

Fitted on the H100 runs of 2026-11-23 (bench/results/2026-11-23-h100-run*.json) and checked,
unchanged, on an H200 (bench/RESULTS.md). For a GPU without measurements (a T4) the same
efficiencies are applied to its datasheet peak and bandwidth, with its sustained clock under its
power cap: that is the estimate's basis, not a measurement.

Liger counts when `use_liger_kernel` is `true` or `auto` (preflight's rule: on for every known GPU
type, where liger-kernel is installed). Tokens per run: `max_steps` × tokens per step, or the dataset's tokens (a local .jsonl/.json:
characters / 4, the usual English rate of Llama-family tokenizers) × epochs. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from .job.config import HubPin, RunConfig
from .preflight import (
    TRL_DEFAULT_MAX_LENGTH,
    ModelShape,
    _liger,
    _offloading_mode,
    checkpointing_mode,
    lora_targets,
    model_shape,
    normalise_gpu,
    step_shape,
)


@dataclass(frozen=True)
class GpuSpec:
    fp16_flops: float  # dense fp16 tensor-core peak, FLOP/s
    memory_bandwidth: float  # bytes/s
    host_link: float  # bytes/s to pinned host memory (PCIe)
    sustained: float = 1.0  # fraction of the boost clock held under load (power cap)


GPU_SPECS: dict[str, GpuSpec] = {
    # 70 W card: under sustained tensor-core load it runs well below its 1.59 GHz boost clock.
    "t4": GpuSpec(65e12, 320e9, 12e9, sustained=0.8),
    "v100": GpuSpec(125e12, 900e9, 12e9),
    "l4": GpuSpec(121e12, 300e9, 25e9),
    "a10": GpuSpec(125e12, 600e9, 25e9),
    "a10g": GpuSpec(70e12, 600e9, 25e9),
    "rtx3090": GpuSpec(71e12, 936e9, 25e9),
    "rtx4090": GpuSpec(165e12, 1008e9, 25e9),
    "a6000": GpuSpec(155e12, 768e9, 25e9),
    "l40s": GpuSpec(362e12, 864e9, 25e9),
    "a100": GpuSpec(312e12, 1555e9, 25e9),
    "a100-80gb": GpuSpec(312e12, 2039e9, 25e9),
    "h100": GpuSpec(989.4e12, 3350e9, 50e9),
    "h200": GpuSpec(989.4e12, 4800e9, 50e9),
}
for _alias, _name in {"v100-16gb": "v100", "v100-32gb": "v100", "a100-40gb": "a100", "h100-80gb": "h100"}.items():
    GPU_SPECS[_alias] = GPU_SPECS[_name]

# Fitted on H100 (bench/RESULTS.md "Time estimate"): packed 4×1024 at 0.539 s/step and 12×1024
# at 1.357 s/step give the per-token cost and the fixed part; t4 + Liger at 1.054 s the Liger
# efficiency; the warm notebook (0.625 s/step) the unpacked-shape cost.
MATMUL_EFFICIENCY = 0.464
MATMUL_EFFICIENCY_LIGER = 0.64
# LoRA's own work is memory-bound (dropout, the thin A/B products, the adds): bytes per adapted
# feature (in + out) per token, fitted on t4 + LoRA all-linear (1.80 s/step vs 1.37).
LORA_BYTES_PER_FEATURE = 42
HOST_SECONDS_PER_LAYER = 2.9e-3
BANDWIDTH_EFFICIENCY = 0.7
UNPACKED_SECONDS_PER_STEP = 0.34
OFFLOAD_EXPOSED = 0.15  # measured +1.6% per step on an H200 for 6.4 GB moved per step
STARTUP_SECONDS = 4.0  # first-step compilation, inside the trainer's train_runtime
CHARS_PER_TOKEN = 4.0
# Padded tokens per real token of a batch: length-grouped batches (measured on the bench data).
GROUPED_PADDING = 1.06
# Data-parallel runs: the all-reduce carries only the LoRA gradients (#17 will measure it).
DATA_PARALLEL_EFFICIENCY = 0.9


@dataclass
class TimeEstimate:
    run_id: str
    gpu_type: str
    gpus: int
    seconds_per_step: float | None = None
    steps: int | None = None
    tokens: int | None = None  # real (non-padding) tokens the run trains on
    seconds: float | None = None  # expected training time (wall clock)
    note: str = ""

    @property
    def gpu_hours(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.gpus / 3600


def step_seconds(
    run: RunConfig, shape: ModelShape, spec: GpuSpec, tokens: float, rows: int, row_length: int, packed: bool
) -> float:
    """Seconds per micro-batch step of `tokens` (padding included) in `rows` rows."""
    mode = checkpointing_mode(run)
    passes = 3 if mode != "none" else 2
    flops_per_token = 2 * shape.linear_params * passes + 4 * shape.vocab_size * shape.hidden_size
    # Attention: forward, backward (twice the forward's work) and, under full checkpointing,
    # its recompute; selective checkpointing keeps its output instead.
    attention_passes = 4 if mode == "full" else 3
    attention = rows * shape.num_layers * 4 * row_length**2 * shape.hidden_size * attention_passes
    efficiency = MATMUL_EFFICIENCY_LIGER if _liger(run) else MATMUL_EFFICIENCY
    peak = spec.fp16_flops * spec.sustained
    matmul = (tokens * flops_per_token + attention) / (peak * efficiency)
    bandwidth = spec.memory_bandwidth * BANDWIDTH_EFFICIENCY
    dequant = passes * shape.linear_params * (0.5625 + 2 + 2) / bandwidth if run.quantization.load_in_4bit else 0.0
    host = HOST_SECONDS_PER_LAYER * shape.num_layers
    layer_shapes = shape.linear_shapes()
    features = sum(sum(layer_shapes[t]) for t in lora_targets(run, shape))
    lora = tokens * shape.num_layers * features * LORA_BYTES_PER_FEATURE / bandwidth
    offload = 0.0
    offloading = _offloading_mode(run)
    if offloading:
        moved = 2 * shape.num_layers * tokens * 2 * shape.hidden_size  # out and back, fp16
        offload = (1.0 if offloading == "sync" else OFFLOAD_EXPOSED) * moved / spec.host_link
    return host + dequant + matmul + lora + offload + (0.0 if packed else UNPACKED_SECONDS_PER_STEP)


def example_lengths(run: RunConfig) -> list[int] | None:
    """Estimated tokens per example of the run's dataset, None when unknown: a local
    .jsonl/.json file, or a hub dataset `qlaunch prefetch` has put into the shared cache."""
    rows = _local_rows(run)
    if rows is None:
        rows = prefetched_rows(run)
    if rows is None:
        return None
    if run.dataset.max_samples is not None:
        rows = rows[: run.dataset.max_samples]
    keep = 1 - (run.dataset.test_size if run.dataset.test_size < 1 else run.dataset.test_size / max(1, len(rows)))
    rows = rows[: max(1, int(len(rows) * keep))]
    return [max(1, math.ceil(_characters(row) / CHARS_PER_TOKEN)) + 2 for row in rows]  # + BOS, EOS


def _local_rows(run: RunConfig) -> list | None:
    path = run.resolve_path(run.dataset.path)
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return None
    try:
        text = path.read_text()
        rows = (
            json.loads(text)
            if path.suffix.lower() == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except (OSError, ValueError):
        return None
    if isinstance(rows, dict):  # {"data": [...]} layouts
        rows = next((v for v in rows.values() if isinstance(v, list)), [])
    return rows


def prefetched_rows(run: RunConfig) -> list | None:
    """The rows of a hub dataset from the shared cache, at the commit the experiment's pins
    record names (`qlaunch prefetch`, or a submit, wrote them); None before any prefetch.

    The split's data files (names containing the split, else every data file) are read with
    launcher.data_files: JSONL/JSON/CSV in full, Parquet through pyarrow where installed (a
    sample of rows, repeated up to the file's row count from its metadata)."""
    from .job import hub
    from .job.data_files import LOCAL_FORMATS, read_rows

    refs = [ref for ref in hub.hub_refs(run) if ref.key == "dataset.path"]
    if not refs:
        return None
    storage_root = Path(run.run_dir).parents[1]
    try:
        record = hub.read_pins(hub.pins_path(storage_root, run.name)).get(refs[0].pin_key)
    except Exception:  # noqa: BLE001 - an unreadable record only means no estimate here
        return None
    if not record:
        return None
    pin = HubPin(
        key="dataset.path",
        repo_id=refs[0].repo_id,
        repo_type="dataset",
        revision=record["revision"],
        files=record.get("files", []),
    )
    snapshot = hub.snapshot_dir(run, pin)
    data = [name for name in pin.files if Path(name).suffix.lower() in LOCAL_FORMATS]
    split = run.dataset.split.split("[", 1)[0]
    chosen = [name for name in data if split in Path(name).name] or data
    rows: list = []
    for name in sorted(chosen):
        found = read_rows(snapshot / name)
        if found.error or found.unchecked or found.count is None:
            return None
        sample = [row for _, row in found.rows]
        if not sample:
            continue
        rows += [sample[i % len(sample)] for i in range(found.count)]
    return rows or None


def _characters(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_characters(v) for v in value.values())
    if isinstance(value, list):
        return sum(_characters(v) for v in value)
    return 0


def estimate_time(run: RunConfig) -> TimeEstimate:
    gpu = normalise_gpu(run.resources.gpu_type)
    gpus = run.resources.nodes * run.resources.gpus_per_node
    estimate = TimeEstimate(run.run_id, run.resources.gpu_type, gpus)
    if gpus == 0:
        return _cpu_estimate(run, estimate)
    spec, shape = GPU_SPECS.get(gpu), model_shape(run)
    if spec is None:
        estimate.note = f"no throughput data for gpu_type {run.resources.gpu_type!r}"
        return estimate
    if shape is None:
        estimate.note = "model shape unknown"
        return estimate
    train, step = run.train, step_shape(run)
    max_length = train.sft_args.get("max_length", train.max_seq_length) or TRL_DEFAULT_MAX_LENGTH
    batch = int(train.sft_args.get("per_device_train_batch_size", train.per_device_train_batch_size))
    per_optimizer_step = batch * train.gradient_accumulation_steps * gpus  # rows or examples
    lengths = example_lengths(run)
    if lengths is not None:
        lengths = [min(n, max_length) for n in lengths]
    if step.packed and not step.flattened:
        fill = 0.995  # best-fit decreasing leaves a few tokens per row empty
        micro_tokens, real_per_micro = step.tokens, step.tokens * fill
        rows_per_epoch = None if lengths is None else math.ceil(sum(lengths) / (max_length * fill))
        units_per_epoch = rows_per_epoch
    else:
        mean = None if lengths is None else sum(lengths) / len(lengths)
        if mean is None:
            real_per_micro = micro_tokens = step.tokens  # worst case: every example max_length long
        else:
            if step.flattened:
                padding = 1.0  # padding-free: the row is the examples' tokens only
            else:
                padding = GROUPED_PADDING if train.group_by_length else _random_padding(lengths, batch)
            real_per_micro = mean * batch
            micro_tokens = min(step.tokens, real_per_micro * padding)
        units_per_epoch = None if lengths is None else len(lengths)
    if train.max_steps and train.max_steps > 0:
        steps = train.max_steps
    elif units_per_epoch is not None:
        steps = math.ceil(units_per_epoch * train.num_train_epochs / per_optimizer_step)
    else:
        estimate.note = _unknown_size_note(run)
        return estimate
    if step.flattened:  # one row of the micro-batch's examples; its shape still changes every step
        rows, row_length, packed = 1, max(1, round(micro_tokens)), False
    else:
        rows = step.rows if step.packed else batch
        row_length = step.row_length if step.packed else max(1, round(micro_tokens / max(1, batch)))
        packed = step.packed
    seconds_per_micro = step_seconds(run, shape, spec, micro_tokens, rows, row_length, packed)
    seconds_per_step = seconds_per_micro * train.gradient_accumulation_steps
    if gpus > 1:
        seconds_per_step /= DATA_PARALLEL_EFFICIENCY
    estimate.seconds_per_step = seconds_per_step
    estimate.steps = steps
    estimate.tokens = int(steps * real_per_micro * train.gradient_accumulation_steps * gpus)
    estimate.seconds = STARTUP_SECONDS + steps * seconds_per_step
    if lengths is None and not step.packed:
        estimate.note = "dataset lengths unknown: every example counted max_seq_length long"
    return estimate


def _unknown_size_note(run: RunConfig) -> str:
    from .job.hub import is_hub_dataset

    if is_hub_dataset(run.dataset.path, run):
        return (
            f"dataset size unknown ({run.dataset.path} is on the hub and not prefetched yet): "
            "qlaunch prefetch, or train.max_steps, gives a time estimate"
        )
    return (
        f"dataset size unknown ({run.dataset.path} is not a local .jsonl/.json): "
        "set train.max_steps for a time estimate"
    )


def _cpu_estimate(run: RunConfig, estimate: TimeEstimate) -> TimeEstimate:
    """A run without a GPU: its steps and tokens, not its time (the model is of GPU throughput)."""
    train, step = run.train, step_shape(run)
    batch = int(train.sft_args.get("per_device_train_batch_size", train.per_device_train_batch_size))
    per_step = batch * train.gradient_accumulation_steps * max(1, run.resources.nodes)
    lengths = example_lengths(run)
    max_length = train.sft_args.get("max_length", train.max_seq_length) or TRL_DEFAULT_MAX_LENGTH
    if lengths is not None:
        lengths = [min(n, max_length) for n in lengths]
    if train.max_steps and train.max_steps > 0:
        estimate.steps = train.max_steps
    elif lengths is not None:
        units = math.ceil(sum(lengths) / (max_length * 0.995)) if step.packed else len(lengths)
        estimate.steps = math.ceil(units * train.num_train_epochs / per_step)
    if estimate.steps is not None and lengths:
        per_unit = max_length * 0.995 if step.packed else sum(lengths) / len(lengths)
        estimate.tokens = int(estimate.steps * per_step * per_unit)
    estimate.note = "no GPU requested: CPU time is not modelled" + (
        "" if estimate.steps is not None else f"; {_unknown_size_note(run)}"
    )
    return estimate


def _random_padding(lengths: list[int], batch: int) -> float:
    """Padded / real tokens of randomly drawn batches: E[max of `batch` lengths] / mean length."""
    ordered = sorted(lengths)
    n = len(ordered)
    # E[max of b draws] = Σ x_(k) · P(max is the k-th smallest), drawing with replacement.
    expected_max = sum(x * (((k + 1) / n) ** batch - (k / n) ** batch) for k, x in enumerate(ordered))
    return expected_max / (sum(ordered) / n)


def estimate_grid(runs: Iterable[RunConfig]) -> list[TimeEstimate]:
    return [estimate_time(run) for run in getattr(runs, "runs", runs)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def format_table(estimates: list[TimeEstimate]) -> Table:
    # A note every run shares (a CPU grid: "CPU time is not modelled") goes under the table once,
    # rather than wrapped into four lines on every row of an 80-column terminal.
    notes = {e.note for e in estimates}
    shared = len(estimates) > 1 and len(notes) == 1 and notes != {""}
    title = "time estimate: training wall clock per run (throughput model, bench/RESULTS.md)"
    table = Table(
        title=title,
        title_justify="left",
        min_width=len(title),  # the title on one line where the terminal is as wide
        caption=f"every run: {estimates[0].note}" if shared else None,
        caption_justify="left",
    )
    columns = ("run", "gpu", "steps", "s/step", "tokens", "time", "GPU-h") + (() if shared else ("note",))
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("run", "gpu", "note") else "right", no_wrap=column in ("run", "gpu")
        )
    for e in estimates:
        table.add_row(
            e.run_id,
            f"{e.gpus}× {e.gpu_type}" if e.gpus else "CPU",
            "?" if e.steps is None else f"{e.steps:,}",
            "?" if e.seconds_per_step is None else f"{e.seconds_per_step:.2f}",
            "?" if e.tokens is None else f"{e.tokens / 1e6:.2f}M" if e.tokens >= 100_000 else f"{e.tokens / 1e3:.1f}k",
            _duration(e.seconds),
            "?" if e.gpu_hours is None else f"{e.gpu_hours:.2f}",
            *(() if shared else (e.note,)),
        )
    known = [e for e in estimates if e.gpu_hours is not None]
    if len(estimates) > 1:
        total = sum(e.gpu_hours for e in known)
        missing = len(estimates) - len(known)
        table.add_row(
            "grid",
            "",
            "",
            "",
            "",
            _duration(sum(e.seconds for e in known)) + " in series" if known else "?",
            f"{total:.2f}" if known else "?",
            *(() if shared else (f"{missing} of {len(estimates)} runs not estimated" if missing else "",)),
        )
    return table
