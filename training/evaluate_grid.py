"""The grid evaluation job: `python -m training.evaluate_grid <runs file> [--force]` (issue #29).

The runs file lists one run.yaml (or run folder) per line. Runs on the same base model (same
`model` and `quantization` sections, same `inference.load_in_4bit`) share one load of it
(4-bit as the per-run job loads it); every adapter is attached to that one model by name
(peft `load_adapter`) before anything is generated, and the self-check of issue #8 (adapter
disabled == the bare base) runs once per loaded base. Then every question is asked in
mixed-adapter batches (`generate(adapter_names=...)`): each prompt in each distinct formatting
once for the base model (`__base__`) and once for each adapter, ROWS_PER_BATCH answers per batch
(whole prompts, at least the per-run job's eight). Left padding is masked, so a row's answer does
not depend on its batch beyond float rounding (bench/eval_grid.py: all answers equal). Each run's
`inference/results.jsonl` and `summary.json` are then written exactly as `training.infer` writes
them, with `eval_set` (launcher.evaluation) and `evaluated_by`.

A run that cannot be evaluated (not trained, adapter missing or unreadable, bad inputs) is
reported "not evaluated: <why>" in the log and in `evaluation.json`; the others are evaluated.
A run already scored on its current eval set is skipped unless --force.

Exit codes: 0 when at least one run was evaluated (or every run was already scored), 2 when the
runs file cannot be read, 1 when no listed run could be evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.job import grid_evaluation
from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.experiment_file import load_run_config
from launcher.job.progress import emit, make_event, read_events
from launcher.job.storage import RunPaths, atomic_write_text, write_json

from .adapter_check import BaseModelChanged
from .entrypoint import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, log
from .hub_files import apply_offline_env, check_prefetched
from .infer import BATCH_SIZE, Item, clean_answer, collect_items, print_table, score
from .log_noise import quiet_job_logs

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# Rows (prompt × adapter) per mixed batch: whole prompts, at least BATCH_SIZE of them. Fewer,
# larger batches are what make the grid fast on a CPU (each step pays a fixed cost per LoRA
# layer and adapter, whatever the rows); a GPU caps them by its free memory.
ROWS_PER_BATCH = 192


@dataclass
class Entry:
    listed: str
    run: RunConfig | None = None
    adapter: str = ""  # the adapter's name on the shared model
    items: list[Item] = field(default_factory=list)
    evals: list[Item] = field(default_factory=list)
    metrics: list = field(default_factory=list)
    outcome: str = "pending"  # evaluated | skipped | not evaluated
    why: str = ""

    @property
    def label(self) -> str:
        return self.run.run_id if self.run else self.listed

    def drop(self, outcome: str, why: str) -> None:
        self.outcome, self.why = outcome, why
        log(f"{self.label}: {outcome}: {why}")


# --- which runs ---------------------------------------------------------------------------------


def read_listing(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the runs file: {exc.strerror}") from None
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        raise ConfigError(f"{path}: lists no runs")
    return listed


def training_problem(paths: RunPaths) -> str | None:
    if paths.training_completed():
        return None
    errors = [e for e in read_events(paths.progress) if e.get("event") == "error"]
    if errors:
        return f"training failed: {str(errors[-1].get('message', 'error')).strip()[:200]}"
    if paths.progress.is_file():
        return "training did not complete (stopped or still running: no final adapter)"
    return "not trained (no adapter)"


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter folder cannot be attached, found before it touches the shared model."""
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
        from peft import PeftConfig

        PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any reason is the run's, not the job's
        return f"adapter config {config} is unreadable: {_one_line(exc)}"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return f"no adapter weights in {folder}" if not (folder / "adapter_model.bin").is_file() else None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception as exc:  # noqa: BLE001
        return f"adapter weights {weights} are unreadable: {_one_line(exc)}"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def prepare(entry: Entry, force: bool) -> None:
    """Load the run and its questions; sets the outcome of a run that cannot be evaluated."""
    from .entrypoint import input_errors

    try:
        entry.run = load_run_config(entry.listed)
    except ConfigError as exc:
        return entry.drop("not evaluated", str(exc))
    run, paths = entry.run, RunPaths.of(entry.run)
    entry.adapter = f"run_{run.run_id}"
    problem = training_problem(paths)
    if problem:
        return entry.drop("not evaluated", problem)
    if not force and grid_evaluation.already_scored(run):
        return entry.drop("skipped", "already scored on this eval set")
    apply_offline_env(run)
    problems = input_errors(run, str(paths.config), ("model", "inference"))
    if problems:
        return entry.drop("not evaluated", problems[0])
    try:
        entry.items, entry.evals = collect_items(run, [], None)
        from launcher.job.metrics import get_metrics

        entry.metrics = get_metrics(run.inference.metric) if entry.evals else []
        check_prefetched(run)
    except ConfigError as exc:
        return entry.drop("not evaluated", str(exc))
    if not entry.items and not entry.evals and run.inference.lm_eval is None:
        return entry.drop("not evaluated", "no prompts (inference.prompts / prompts_file / eval_file / lm_eval)")
    try:
        from .lm_eval_run import problem as benchmark_problem

        problem = benchmark_problem(run)
    except Exception as exc:  # noqa: BLE001 - a task folder lm-eval cannot index is the run's problem
        problem = f"inference.lm_eval: {_one_line(exc)}"
    if problem:
        return entry.drop("not evaluated", problem)
    problem = adapter_problem(paths.adapter)
    if problem:
        return entry.drop("not evaluated", problem)


def base_key(run: RunConfig) -> str:
    """Runs with equal keys share one loaded base model."""
    return json.dumps(
        [run.model.model_dump(mode="json"), run.quantization.model_dump(mode="json"), run.inference.load_in_4bit],
        sort_keys=True,
    )


# --- generation ---------------------------------------------------------------------------------


def generation_key(run: RunConfig) -> tuple:
    return (run.inference.max_new_tokens, run.inference.temperature)


def rows_per_batch(
    model, adapters_per_prompt: int, longest: int, max_new_tokens: int, rows: int = ROWS_PER_BATCH
) -> int:
    """Whole prompts (at least BATCH_SIZE, the per-run job's batch) × every adapter, up to
    `rows`; fewer on a GPU whose free memory would not hold the key/value cache of that many."""
    import torch

    wanted = max(BATCH_SIZE, rows // adapters_per_prompt) * adapters_per_prompt
    if not torch.cuda.is_available():
        return wanted
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_row = 2 * config.num_hidden_layers * heads * head_dim * 2 * (longest + max_new_tokens)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(wanted, int(free * 0.6 // max(per_row, 1))))


def answers_per_call(
    runs: list[RunConfig],
    model,
    adapters_per_prompt: int,
    longest: int,
    max_new_tokens: int,
    rows: int = ROWS_PER_BATCH,
) -> int:
    """inference.batch_size where these runs set it (the smallest asked), else auto: by memory."""
    chosen = sorted({run.inference.batch_size for run in runs} - {"auto"})
    return int(chosen[0]) if chosen else rows_per_batch(model, adapters_per_prompt, longest, max_new_tokens, rows)


def generate_rows(model, tokenizer, rows: list[tuple[str, str]], settings: tuple, per_batch: int) -> list[str]:
    """Answers for (text, adapter) rows, `per_batch` rows per mixed-adapter generate call."""
    import torch

    max_new_tokens, temperature = settings
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = next(model.parameters()).device

    def answer(chunk: list[tuple[str, str]], **adapters) -> list[str]:
        batch = tokenizer([text for text, _ in chunk], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            output = model.generate(
                **batch,
                **adapters,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    answers: list[str] = []
    try:
        for start in range(0, len(rows), per_batch):
            chunk = rows[start : start + per_batch]
            answers += answer(chunk, adapter_names=[adapter for _, adapter in chunk])
        return answers
    except (ValueError, TypeError) as exc:
        if answers or "adapter" not in str(exc):
            raise
        # A layer PEFT cannot batch adapters through (DoRA, merged weights): adapter by adapter.
        log(f"mixed-adapter batches not supported here ({_one_line(exc)}): answering adapter by adapter")
    by_row: dict[tuple[str, str], str] = {}
    for who in dict.fromkeys(adapter for _, adapter in rows):
        mine = [row for row in rows if row[1] == who]
        for start in range(0, len(mine), BATCH_SIZE):
            chunk = mine[start : start + BATCH_SIZE]
            if who == BASE:
                with model.disable_adapter():
                    texts = answer(chunk)
            else:
                model.set_adapter(who)
                texts = answer(chunk)
            by_row.update(zip(chunk, texts))
    return [by_row[row] for row in rows]


def evaluate_group(entries: list[Entry], cuda: bool, job: dict[str, Any], batch_rows: int = ROWS_PER_BATCH) -> None:
    """One base model, every entry's adapter: answers, scores, files."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .adapter_check import check_base_unchanged, probe_logits
    from .formatting import format_prompt, without_leading_bos
    from .model_source import load_model, resolve_model

    first = entries[0].run
    tokenizer = AutoTokenizer.from_pretrained(RunPaths.of(first).adapter)  # the tokenizer it trained with
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    loaded = time.time()
    log(
        f"loading base model {first.model.name_or_path} ({'4-bit' if first.inference.load_in_4bit else 'unquantized'}) "
        f"once for {len(entries)} runs"
    )
    model = load_model(first, resolve_model(first), cuda=cuda, load_in_4bit=first.inference.load_in_4bit)
    model.eval()
    job["base_loads"] += 1

    def text_of(entry: Entry, prompt: str) -> str:
        return without_leading_bos(format_prompt(entry.run, tokenizer, prompt), tokenizer)

    # Every adapter is attached before the first forward pass through the wrapped model (#8).
    asked = entries[0].items + entries[0].evals
    probe = text_of(entries[0], asked[0].prompt if asked else "Hello")
    reference = probe_logits(model, tokenizer, probe)
    attached: list[Entry] = []
    for entry in entries:
        folder = str(RunPaths.of(entry.run).adapter)
        try:
            if not attached:
                model = PeftModel.from_pretrained(model, folder, adapter_name=entry.adapter)
            else:
                model.load_adapter(folder, adapter_name=entry.adapter)
            attached.append(entry)
        except Exception as exc:  # noqa: BLE001
            if not attached:
                raise
            if entry.adapter in getattr(model, "peft_config", {}):
                model.delete_adapter(entry.adapter)
            entry.drop("not evaluated", f"attaching the adapter failed: {_one_line(exc)}")
    model.eval()
    difference = check_base_unchanged(model, tokenizer, probe, reference)
    log(f"self-check: with adapters disabled the model is the base model (max logit difference {difference:.3g})")
    load_seconds = time.time() - loaded

    # Rows: each (formatted prompt, adapter) once; the base model's rows shared by every run that
    # formats the prompt the same way and generates with the same settings.
    started = time.time()
    by_settings: dict[tuple, dict[str, list[str]]] = {}  # settings → formatted text → adapters
    for entry in attached:
        texts = by_settings.setdefault(generation_key(entry.run), {})
        for item in entry.items + entry.evals:
            adapters = texts.setdefault(text_of(entry, item.prompt), [])
            for who in ([BASE] if entry.run.inference.compare_base else []) + [entry.adapter]:
                if who not in adapters:
                    adapters.append(who)
    answers: dict[tuple, str] = {}
    for settings, texts in by_settings.items():
        if not texts:  # runs with lm-eval tasks only
            continue
        # The base model's rows first: it has not learned the task's format (or where to stop),
        # so its answers tend to run to max_new_tokens, and generate runs a batch until its
        # longest row ends. Batched together, they leave the adapters' batches free to stop
        # when the adapters' (shorter) answers end (bench/RESULTS.md).
        rows = [(text, BASE) for text, adapters in texts.items() if BASE in adapters]
        rows += [(text, who) for text, adapters in texts.items() for who in adapters if who != BASE]
        width = max(len(adapters) for adapters in texts.values())
        longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
        runs = [e.run for e in attached if generation_key(e.run) == settings]
        per_batch = answers_per_call(runs, model, width, longest, settings[0], batch_rows)
        log(
            f"answering {len(texts)} prompts × {width} (base + adapters): {len(rows)} answers, "
            f"{per_batch} per batch, max_new_tokens {settings[0]}"
        )
        for (text, who), answer in zip(rows, generate_rows(model, tokenizer, rows, settings, per_batch)):
            answers[(settings, text, who)] = answer
    generate_seconds = time.time() - started
    benchmarks, benchmark_seconds = run_benchmarks_for(model, tokenizer, attached, job)

    device = "cpu"
    if cuda:
        import torch

        device = torch.cuda.get_device_name(0)
    for entry in attached:
        write_run(
            entry,
            answers,
            text_of,
            {
                "device": device,
                "base_check_max_logit_diff": difference,
                "evaluated_by": {
                    "job": "grid",
                    "runs": len(attached),
                    "base_loads": 1,
                    "load_seconds": round(load_seconds, 2),
                    "generate_seconds": round(generate_seconds, 2),
                    **({"lm_eval_seconds": round(benchmark_seconds, 2)} if benchmarks else {}),
                },
            },
            benchmarks.get(entry.adapter),
        )
    del model


def lm_eval_key(run: RunConfig) -> str:
    """Runs with equal keys share the base model's lm-eval scores."""
    settings = run.inference.lm_eval
    return json.dumps([settings.model_dump(mode="json") if settings else None, run.experiment_dir], sort_keys=True)


def run_benchmarks_for(model, tokenizer, attached: list[Entry], job: dict[str, Any]) -> tuple[dict, float]:
    """lm-eval (inference.lm_eval) on the loaded model: the base once per distinct setting, each
    adapter once. Returns adapter name → the run's summary field, and the seconds it took."""
    started = time.time()
    wanting: dict[str, list[Entry]] = {}
    for entry in attached:
        if entry.run.inference.lm_eval is not None:
            wanting.setdefault(lm_eval_key(entry.run), []).append(entry)
    if not wanting:
        return {}, 0.0
    from .lm_eval_run import run_benchmarks, summary_field

    fields: dict[str, dict] = {}
    for members in wanting.values():
        first = members[0].run
        base = any(e.run.inference.compare_base for e in members)
        log(f"lm-eval: tasks {', '.join(first.inference.lm_eval.tasks)} for the base model and {len(members)} adapters")
        try:
            scores = run_benchmarks(model, tokenizer, first, [e.adapter for e in members], base)
        except Exception as exc:  # noqa: BLE001 - said as lm-eval's failure; the group is not evaluated
            traceback.print_exc()
            raise RuntimeError(
                f"lm-eval ({', '.join(first.inference.lm_eval.tasks)}) failed: {_one_line(exc)}"
            ) from exc
        for entry in members:
            fields[entry.adapter] = summary_field(
                entry.run, scores.get(BASE) if entry.run.inference.compare_base else None, scores[entry.adapter]
            )
        job.setdefault("lm_eval_base", []).append(
            {
                "runs": [e.run.run_id for e in members],
                "tasks": list(first.inference.lm_eval.tasks),
                "base": scores.get(BASE),
            }
        )
    return fields, time.time() - started


def write_run(
    entry: Entry, answers: dict, text_of, facts: dict[str, Any], benchmarks: dict[str, Any] | None = None
) -> None:
    run, paths = entry.run, RunPaths.of(entry.run)
    settings = generation_key(run)
    everything = entry.items + entry.evals
    for item in everything:
        text = text_of(entry, item.prompt)
        if run.inference.compare_base:
            item.answers["base"] = clean_answer(run, answers[(settings, text, BASE)])
        item.answers["tuned"] = clean_answer(run, answers[(settings, text, entry.adapter)])
    summary: dict[str, Any] = {
        "run_id": run.run_id,
        "prompts": len(entry.items),
        "eval_examples": len(entry.evals),
        "load_in_4bit": run.inference.load_in_4bit,
        "max_new_tokens": run.inference.max_new_tokens,
        "eval_set": grid_evaluation.eval_set(run),
        **facts,
    }
    if entry.evals:
        summary.update(score(entry.evals, entry.metrics))
    if benchmarks is not None:
        summary["lm_eval"] = benchmarks
    atomic_write_text(
        paths.inference / "results.jsonl",
        "".join(json.dumps(i.record(), ensure_ascii=False) + "\n" for i in everything),
    )
    by = facts["evaluated_by"]
    summary["seconds"] = round(by["load_seconds"] + by["generate_seconds"] + by.get("lm_eval_seconds", 0), 2)
    write_json(paths.inference / "summary.json", summary)
    steps = int((json.loads(paths.metrics.read_text()) or {}).get("global_step", 0))
    emit(make_event("infer_end", steps, summary=summary), paths.progress, sys.stdout)
    entry.outcome, entry.why = "evaluated", ""
    log(f"run {run.run_id}: evaluated")
    if entry.items or entry.evals:
        print_table(entry.items, entry.evals, run.inference.compare_base, shown_evals=2)
    for metric in summary.get("metrics", []):
        base = f"base {metric['base']:.2f} → " if "base" in metric else ""
        log(
            f"run {run.run_id} metric {metric['name']}: {base}tuned {metric['tuned']:.2f} ({metric['n']} held-out examples)"
        )
    for task, row in (benchmarks or {}).get("tasks", {}).items():
        base = f"base {row['base']:.3f} → " if row.get("base") is not None else ""
        log(f"run {run.run_id} lm-eval {task} {row['metric']}: {base}tuned {row['tuned']:.3f} ({row['n']} examples)")
    if benchmarks and run.tracking.report_to:
        from .tracking import record_benchmarks

        try:
            record_benchmarks(run, benchmarks, steps)
        except Exception as exc:  # noqa: BLE001 - a tracker down does not lose the scores on disk
            log(f"run {run.run_id}: lm-eval scores not sent to the trackers: {_one_line(exc)}")
    with open(paths.infer_log, "a") as handle:  # `qlaunch logs --infer` of the run points here
        handle.write(
            f"[qlaunch] evaluated by the grid evaluation job; its log: {paths.root.parent / grid_evaluation.FOLDER / grid_evaluation.LOG_FILE}\n"
        )


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate_grid", description=__doc__.splitlines()[0])
    parser.add_argument("runs_file", help="a file listing one run.yaml (or run folder) per line")
    parser.add_argument("--force", action="store_true", help="evaluate runs already scored on their eval set too")
    parser.add_argument(
        "--rows-per-batch",
        type=int,
        default=ROWS_PER_BATCH,
        help=f"answers per mixed batch, whole prompts × every adapter (default {ROWS_PER_BATCH}; "
        f"at least {BATCH_SIZE} prompts)",
    )
    args = parser.parse_args(argv)
    quiet_job_logs()  # before bitsandbytes and transformers are imported
    started = time.time()
    try:
        entries = [Entry(listed) for listed in read_listing(Path(args.runs_file))]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for entry in entries:
        prepare(entry, args.force)

    import torch

    cuda = torch.cuda.is_available()
    job: dict[str, Any] = {"base_loads": 0}
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.outcome == "pending":
            groups.setdefault(base_key(entry.run), []).append(entry)
    for members in groups.values():
        try:
            evaluate_group(members, cuda, job, max(1, args.rows_per_batch))
        except BaseModelChanged as exc:
            for entry in members:
                entry.drop("not evaluated", str(exc))
        except Exception as exc:  # noqa: BLE001 - the other groups still get their turn
            traceback.print_exc()
            for entry in members:
                if entry.outcome == "pending":
                    entry.drop("not evaluated", f"the evaluation of its base model failed: {_one_line(exc)}")

    outcome = {e.label: {"outcome": e.outcome, **({"why": e.why} if e.why else {})} for e in entries}
    record = {
        "runs": outcome,
        "base_loads": job["base_loads"],
        "seconds": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    known = [e.run for e in entries if e.run is not None]
    if known:
        write_json(grid_evaluation.folder(known) / grid_evaluation.OUTCOMES_FILE, record)
        if job.get("lm_eval_base"):
            write_json(grid_evaluation.folder(known) / grid_evaluation.LM_EVAL_FILE, {"base": job["lm_eval_base"]})
    counts = {name: sum(e.outcome == name for e in entries) for name in ("evaluated", "skipped", "not evaluated")}
    log(
        f"grid evaluation: {counts['evaluated']} evaluated, {counts['skipped']} already scored, "
        f"{counts['not evaluated']} not evaluated; base model loaded {job['base_loads']}× in {record['seconds']:.0f} s"
    )
    for entry in entries:
        if entry.outcome == "not evaluated":
            log(f"not evaluated: {entry.label}: {entry.why}")
    if counts["evaluated"] or counts["skipped"] == len(entries):
        return EXIT_OK
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
