"""Speed levers a run does not use yet, with their measured effect (bench/RESULTS.md).

Packing and the token budget change what a batch holds (more real tokens per optimizer step, so
fewer steps per epoch): they are the user's call, so preflight recommends them instead of turning
them on. Each tip is offered only when the run would still fit its GPU with it.
"""

from __future__ import annotations

from .job.config import RunConfig
from .preflight import GiB, _with_train, estimate_run, step_shape

# examples/profiles/t4-fast.yaml's budget: 12 packed rows of 1024 tokens.
PROFILE_ROWS, PROFILE_ROW_LENGTH = 12, 1024


def tips(run: RunConfig) -> list[str]:
    if run.resources.gpus_per_node == 0:
        return []
    train, extra = run.train, run.train.sft_args
    out: list[str] = []
    if not extra.get("packing", train.packing):
        packed = _with_train(run, packing=True, group_by_length=False)
        fits = estimate_run(packed)
        if fits.fits:
            out.append(
                "train.packing: true (and group_by_length: false): whole examples packed into rows, each "
                "attending only to itself; 3.2× tokens/s at the same 4×1024 slots on an H100 "
                f"(~{fits.estimated_peak_bytes / GiB:.1f} GiB here)"
            )
    else:
        rows = int(extra.get("per_device_train_batch_size", train.per_device_train_batch_size))
        if step_shape(run).tokens < PROFILE_ROWS * PROFILE_ROW_LENGTH and "max_length" not in extra:
            bigger = _with_train(
                run,
                per_device_train_batch_size=max(rows, PROFILE_ROWS),
                max_seq_length=max(train.max_seq_length or PROFILE_ROW_LENGTH, PROFILE_ROW_LENGTH),
            )
            estimate = estimate_run(bigger)
            if estimate.fits:
                out.append(
                    f"token budget: per_device_train_batch_size: {bigger.train.per_device_train_batch_size} × "
                    f"max_seq_length: {bigger.train.max_seq_length} packed tokens per step measured +18–21% "
                    f"tokens/s over 4×1024 on an H100 (~{estimate.estimated_peak_bytes / GiB:.1f} GiB here)"
                )
    if extra.get("use_liger_kernel", train.use_liger_kernel) is False:
        out.append("train.use_liger_kernel: auto (the default): +27% tokens/s on an H200, −1.1 GiB, same loss")
    return out


def summarize(runs) -> list[str]:
    """One line per tip: said once for the whole grid when every run gets it."""
    runs = list(getattr(runs, "runs", runs))
    per_run = {run.run_id: tips(run) for run in runs}
    lines: list[str] = []
    seen: list[str] = []
    for run in runs:
        for tip in per_run[run.run_id]:
            if tip in seen:
                continue
            seen.append(tip)
            having = [run_id for run_id, its in per_run.items() if tip in its]
            who = "every run" if len(having) == len(runs) and len(runs) > 1 else ", ".join(having)
            lines.append(f"{who}: {tip}")
    return lines
