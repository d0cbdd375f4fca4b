"""The grid evaluation's files and eval-set fingerprint (issue #29): what the launcher writes for
the evaluation job and the job writes back, so both sides name them the same way.

    <storage root>/<experiment>/evaluation/
        runs.txt            the run.yaml of every run the job evaluates
        evaluate.log        the job's output
        evaluation.json     what happened to each run: evaluated, skipped (already scored), or
                            not evaluated and why
        lm_eval.json        inference.lm_eval: the base model's lm-eval scores, once per base
                            model and setting (each run's summary.json carries base and tuned)

The eval set (`eval_set` in summary.json) is a fingerprint of everything an answer or a score
depends on besides the adapter: the prompts, the held-out file (prompts + references), the prompt
template and the generation settings. `qlaunch evaluate` skips a run whose summary carries the
current fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import RunConfig
from .storage import RunPaths, read_json

FOLDER = "evaluation"
RUNS_FILE = "runs.txt"
LOG_FILE = "evaluate.log"
OUTCOMES_FILE = "evaluation.json"
LM_EVAL_FILE = "lm_eval.json"


def folder(runs: list[RunConfig] | tuple[RunConfig, ...]) -> Path:
    """<storage root>/<experiment>/evaluation (every run of a grid shares the parent)."""
    return Path(runs[0].run_dir).parent / FOLDER


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def eval_set(run: RunConfig) -> str:
    """First 16 hex of sha256 over the prompts, the eval file's bytes, the prompt formatting and
    the generation settings: equal fingerprints give the same questions, asked the same way."""
    inference = run.inference
    identity = {
        "prompts": list(inference.prompts),
        "prompts_file": _file_digest(run.resolve_path(inference.prompts_file)) if inference.prompts_file else None,
        "eval_file": _file_digest(run.resolve_path(inference.eval_file)) if inference.eval_file else None,
        "metric": inference.metric,
        "max_new_tokens": inference.max_new_tokens,
        "temperature": inference.temperature,
        "load_in_4bit": inference.load_in_4bit,
        "compare_base": inference.compare_base,
        "prompt": run.prompt.model_dump(mode="json"),
    }
    if inference.lm_eval is not None:  # only then: fingerprints of runs without it stay as they were
        identity["lm_eval"] = inference.lm_eval.model_dump(mode="json")
        if inference.lm_eval.include_path:
            folder = run.resolve_path(inference.lm_eval.include_path)
            files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
            identity["lm_eval_files"] = {str(p.relative_to(folder)): _file_digest(p) for p in files}
    text = json.dumps(identity, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def already_scored(run: RunConfig) -> bool:
    summary = read_json(RunPaths.of(run).inference / "summary.json") or {}
    return summary.get("eval_set") == eval_set(run)
