"""Recipe values only the training libraries check, checked when the grid is planned.

Pydantic (launcher/job/config.py) checks types and simple ranges. What is left would pass every
check here and fail inside the queued job, after the wait for a GPU: a `train.sft_args` key trl's
`SFTConfig` does not have, an `optim` or `lr_scheduler_type` transformers does not know,
combinations transformers' `TrainingArguments` refuses (load_best_model_at_end with save steps
that are no multiple of the eval steps, a plateau scheduler without evaluation). `grid.plan`
refuses them, one `file:line: key: message` line each. (bf16 on a T4 is the preflight's: a local
CPU run turns bf16 off, so only a submission to GPUs refuses it.)

The libraries cannot be imported here (login nodes), so their names are data:
`launcher/job/library_names.json`, written from the installed libraries by
`python -m training.library_names` (`make library-names`; a test fails when it is stale). The
job checks `sft_args` again against the trl it has (training/arguments.py).
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any, Iterable

from .config import RunConfig, TrainConfig
from .run_checks import Finding

NAMES_FILE = Path(__file__).with_name("library_names.json")

# Set by the job itself (training/arguments.py): where checkpoints go and how resuming works is
# not the user's to move.
RESERVED_SFT_ARGS = {
    "output_dir": "checkpoints always go to <run dir>/checkpoints",
    "overwrite_output_dir": "runs resume from their checkpoints",
    "resume_from_checkpoint": "the job resumes from its newest complete checkpoint by itself",
    "completion_only_loss": "use train.completion_only_loss",
    "assistant_only_loss": "answer-only loss is train.completion_only_loss, masked by the rendered prompt",
    "report_to": "use tracking.report_to (one tracked run per grid run, across attempts)",
}
# Schedulers that step on evaluation results (TrainingArguments refuses them without evaluation).
EVAL_SCHEDULERS = {"reduce_lr_on_plateau", "greedy"}


@functools.lru_cache(maxsize=1)
def library_names() -> dict[str, Any]:
    return json.loads(NAMES_FILE.read_text())


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """', did you mean 'X'?' for the closest choice, or ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f", did you mean {match[0]!r}?" if match else ""


def _name_finding(key: str, value: Any, kind: str, names: list[str]) -> Finding | None:
    if value in names:
        return None
    hint = did_you_mean(value, names) or f" (known: {', '.join(names)})"
    return Finding(key, f"{value!r} is not {kind} of transformers {library_names()['versions']['transformers']}{hint}")


def sft_arg_problem(key: str) -> str | None:
    """Why `train.sft_args.<key>` cannot be passed to trl's SFTConfig, or None."""
    names = library_names()
    fields = names["sft_config_fields"]
    if key in RESERVED_SFT_ARGS:
        return f"set by qlaunch ({RESERVED_SFT_ARGS[key]})"
    if key in fields:
        return None
    # A qlaunch name in the wrong place (max_seq_length, warmup_ratio) before trl's names.
    hint = f", did you mean train.{key}?" if key in TrainConfig.model_fields else did_you_mean(key, fields)
    return f"unknown SFTConfig argument (trl {names['versions']['trl']}){hint}"


def sft_args_findings(run: RunConfig) -> list[Finding]:
    return [
        Finding(f"train.sft_args.{key}", problem) for key in run.train.sft_args if (problem := sft_arg_problem(key))
    ]


def recipe_findings(run: RunConfig) -> list[Finding]:
    """Every value of one run that only trl/transformers would refuse, in the job."""
    t, extra, names = run.train, run.train.sft_args, library_names()
    findings = sft_args_findings(run)
    for key, value in (("train.optim", t.optim), ("train.sft_args.optim", extra.get("optim"))):
        if value is not None and (problem := _name_finding(key, value, "an optimizer", names["optimizers"])):
            findings.append(problem)
    scheduler = extra.get("lr_scheduler_type", t.lr_scheduler_type)
    for key, value in (
        ("train.lr_scheduler_type", t.lr_scheduler_type),
        ("train.sft_args.lr_scheduler_type", extra.get("lr_scheduler_type")),
    ):
        if value is not None and (problem := _name_finding(key, value, "a scheduler", names["lr_scheduler_types"])):
            findings.append(problem)
    eval_strategy = extra.get("eval_strategy", t.eval_strategy)
    if scheduler in EVAL_SCHEDULERS and eval_strategy == "no":
        findings.append(
            Finding(
                "train.lr_scheduler_type",
                f"{scheduler!r} steps on evaluation results: set "
                "train.eval_strategy (and dataset.test_size) or choose another scheduler",
            )
        )
    if t.max_steps == 0 or t.max_steps < -1:
        findings.append(
            Finding(
                "train.max_steps",
                f"{t.max_steps}: use a positive number of steps, or -1 to train train.num_train_epochs epochs",
            )
        )
    findings += _best_model_findings(t)
    warmup = extra.get("warmup_steps")
    if isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and warmup < 0:
        findings.append(Finding("train.sft_args.warmup_steps", f"{warmup}: must be 0 or more"))
    if extra.get("dataloader_prefetch_factor") is not None and not extra.get(
        "dataloader_num_workers", t.dataloader_num_workers
    ):
        findings.append(
            Finding(
                "train.sft_args.dataloader_prefetch_factor",
                "needs train.dataloader_num_workers above 0 (there are no worker processes to prefetch)",
            )
        )
    return findings


def _best_model_findings(t: TrainConfig) -> list[Finding]:
    """TrainingArguments' rule for load_best_model_at_end: evaluations where the checkpoints are.
    qlaunch saves by steps (checkpoints are what a preempted job resumes from) unless
    sft_args.save_strategy says otherwise; sft_args win over the train keys, as in the job."""
    extra = t.sft_args

    def value(name: str) -> tuple[str, Any]:
        return (f"train.sft_args.{name}", extra[name]) if name in extra else (f"train.{name}", getattr(t, name))

    if not extra.get("load_best_model_at_end", t.load_best_model_at_end):
        return []
    save_strategy = extra.get("save_strategy", "steps")
    strategy_key, eval_strategy = value("eval_strategy")
    if save_strategy == "best":
        return []
    if eval_strategy != save_strategy:
        return [
            Finding(
                strategy_key,
                f"{eval_strategy!r}: load_best_model_at_end needs it to be {save_strategy!r} "
                f"(qlaunch saves every train.save_steps steps)",
            )
        ]
    save_key, save_steps = value("save_steps")
    eval_key, eval_steps = value("eval_steps")
    if eval_steps is None:
        eval_key, eval_steps = value("logging_steps")
        eval_key += " (eval_steps is null)"
    numbers = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (save_steps, eval_steps))
    if eval_strategy == "steps" and numbers and save_steps % eval_steps:
        return [
            Finding(
                save_key,
                f"{save_steps} is not a multiple of {eval_key} = {eval_steps}: "
                "load_best_model_at_end needs a checkpoint at every evaluation",
            )
        ]
    return []
