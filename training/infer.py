"""The inference job: `python -m training.infer <run.yaml or run dir> [--prompt TEXT ...]
[--prompts-file F] [--merge] [--no-base]`.

Loads the base model (4-bit by default, `inference.load_in_4bit`) and the run's adapter from
storage, answers the prompts greedily in the prompt template the run trained with, base and
fine-tuned side by side, and scores `inference.eval_file` (held-out prompt + reference) for both.
Writes `<run dir>/inference/results.jsonl` and `summary.json`; `--merge` also writes the
adapter merged into a float16 copy of the base to `<run dir>/merged/`.

Exit codes: 0 done, 2 bad input (run not trained yet, unreadable prompts), 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.progress import emit, make_event
from launcher.job.protocol import WAIT_FOR_TRAINING_ENV
from launcher.job.search import pruned_decision, pruned_text
from launcher.job.storage import RunPaths, atomic_write_text, write_json

from .adapter_check import BaseModelChanged
from .entrypoint import (
    EXIT_CONFIG,
    EXIT_OK,
    input_errors,
    load_run_or_report,
    log,
    run_with_token,
)
from .hub_files import apply_offline_env
from .log_noise import quiet_job_logs

BATCH_SIZE = 8


@dataclass
class Item:
    prompt: str
    reference: str | None = None  # set for held-out eval rows
    answers: dict[str, str] = field(default_factory=dict)  # "base" / "tuned" → answer
    scores: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        row: dict[str, Any] = {"kind": "eval" if self.reference is not None else "prompt", "prompt": self.prompt}
        if self.reference is not None:
            row["reference"] = self.reference
        for who, answer in self.answers.items():
            row[who] = answer
            if who in self.scores:
                row[f"{who}_score"] = self.scores[who]
        return row


# --- reading prompts ----------------------------------------------------------------------------


def read_prompts_file(path: Path, key: str) -> list[str]:
    """A .jsonl with a "prompt" field per line, or plain text with one prompt per line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f'{path}:{number}: expected a JSON object with a "prompt" field') from None
        else:
            prompts.append(line)
    return prompts


def read_eval_file(path: Path) -> list[Item]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"inference.eval_file: cannot read {path}: {exc.strerror}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(
                Item(
                    str(row["prompt"]),
                    reference=row["reference"] if isinstance(row["reference"], str) else json.dumps(row["reference"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f'{path}:{number}: expected a JSON object with "prompt" and "reference" fields') from None
    if not items:
        raise ConfigError(f"inference.eval_file: {path} has no examples")
    return items


def collect_items(run: RunConfig, cli_prompts: list[str], cli_file: str | None) -> tuple[list[Item], list[Item]]:
    """(free prompts, eval items). Prompts given on the command line replace the experiment's,
    held-out scoring included: an ad-hoc question is not the run's evaluation."""
    if cli_prompts or cli_file:
        prompts = list(cli_prompts)
        if cli_file:
            prompts += read_prompts_file(Path(cli_file).expanduser().resolve(), "--prompts-file")
    else:
        prompts = list(run.inference.prompts)
        if run.inference.prompts_file:
            prompts += read_prompts_file(run.resolve_path(run.inference.prompts_file), "inference.prompts_file")
    adhoc = bool(cli_prompts or cli_file)
    evals = read_eval_file(run.resolve_path(run.inference.eval_file)) if run.inference.eval_file and not adhoc else []
    return [Item(p) for p in prompts], evals


# --- generation ---------------------------------------------------------------------------------


def clean_answer(run: RunConfig, text: str) -> str:
    # With the llama2 template on a tokenizer whose EOS is not "</s>", the literal "</s>" ends the
    # answer (and a model may run on into a new "[INST]" turn).
    if run.prompt.template == "llama2":
        for marker in ("</s>", "[INST]"):
            text = text.split(marker, 1)[0]
    return text.strip()


def generate(run: RunConfig, model, tokenizer, prompts: list[str]) -> list[str]:
    import torch

    from .formatting import format_prompt, without_leading_bos

    settings = run.inference
    texts = [without_leading_bos(format_prompt(run, tokenizer, p), tokenizer) for p in prompts]
    sampling = (
        {"do_sample": True, "temperature": settings.temperature} if settings.temperature > 0 else {"do_sample": False}
    )
    answers: list[str] = []
    device = next(model.parameters()).device
    size = settings.rows(BATCH_SIZE)  # inference.batch_size
    for start in range(0, len(texts), size):
        batch = tokenizer(texts[start : start + size], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [clean_answer(run, t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _probe_text(run: RunConfig, tokenizer, prompt: str) -> str:
    from .formatting import format_prompt, without_leading_bos

    return without_leading_bos(format_prompt(run, tokenizer, prompt), tokenizer)


def answer_all(run: RunConfig, who: str, model, tokenizer, items: list[Item]) -> float:
    started = time.time()
    for item, answer in zip(items, generate(run, model, tokenizer, [i.prompt for i in items])):
        item.answers[who] = answer
    return time.time() - started


# --- report -------------------------------------------------------------------------------------


def print_table(items: list[Item], evals: list[Item], with_base: bool, shown_evals: int = 5) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width), soft_wrap=False)
    table = Table(title="base vs fine-tuned", show_lines=True)
    table.add_column("prompt", ratio=2)
    if evals:
        table.add_column("reference", ratio=2)
    if with_base:
        table.add_column("base", ratio=3)
    table.add_column("fine-tuned", ratio=3)
    for item in items + evals[:shown_evals]:
        row = [item.prompt]
        if evals:
            row.append(item.reference or "")
        if with_base:
            row.append(_marked(item, "base"))
        row.append(_marked(item, "tuned"))
        table.add_row(*row)
    console.print(table)
    if len(evals) > shown_evals:
        console.print(f"({len(evals) - shown_evals} more held-out examples in results.jsonl)")


def _marked(item: Item, who: str) -> str:
    answer = item.answers.get(who, "")
    if who in item.scores:
        return f"{answer}\n[{'✓' if item.scores[who] >= 1 else '✗'} {item.scores[who]:.2f}]"
    return answer


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.infer",
        description="Answer prompts with the base model and the run's adapter, side by side.",
    )
    parser.add_argument("run", help="the run's run.yaml, or its run folder")
    parser.add_argument(
        "--prompt", action="append", default=[], help="a prompt (repeatable); replaces the experiment's prompts"
    )
    parser.add_argument("--prompts-file", help='.jsonl with a "prompt" field, or one prompt per line')
    parser.add_argument("--merge", action="store_true", help="also write the merged float16 model to <run dir>/merged/")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's answers")
    args = parser.parse_args(argv)
    quiet_job_logs()  # before bitsandbytes, datasets, transformers are imported
    run = load_run_or_report(args.run)
    if run is None:
        return EXIT_CONFIG
    apply_offline_env(run)
    paths = RunPaths.of(run)
    # Ad-hoc prompts (--prompt / --prompts-file) do not read the experiment's inference files.
    if input_errors(run, args.run, ("model",) if args.prompt or args.prompts_file else ("model", "inference")):
        return EXIT_CONFIG
    return run_with_token(run, lambda: infer(run, paths, args), refusals=(BaseModelChanged,))


# Set on the Kubernetes inference container: a cluster whose Kueue labels every Job (a LocalQueue
# named "default", or manageJobsWithoutQueueName) admits the suspended inference Job before
# training has released it; it then waits here for training rather than failing.
WAIT_POLL_SECONDS = 15.0


def wait_for_training(paths: RunPaths, env: dict[str, str] | None = None, poll: float = WAIT_POLL_SECONDS) -> None:
    """Until the adapter and metrics.json exist (the Job's activeDeadlineSeconds bounds it)."""
    env = os.environ if env is None else env
    if env.get(WAIT_FOR_TRAINING_ENV) != "1" or paths.training_completed():
        return
    log(f"started before training finished (admitted early by the cluster's queue?): waiting for {paths.metrics}")
    while not paths.training_completed():
        time.sleep(poll)
    log("training finished: starting inference")


def infer(run: RunConfig, paths: RunPaths, args) -> int:
    wait_for_training(paths)
    pruned = pruned_decision(paths.metrics)
    if pruned and not (args.prompt or args.prompts_file or args.merge):
        log(
            f"run {run.run_id} was stopped early by asha ({pruned_text(pruned)}): not evaluated "
            f"(qlaunch infer {run.run_id} --prompt ... still answers with its adapter)"
        )
        return EXIT_OK
    if not (paths.adapter / "adapter_config.json").is_file():
        raise ConfigError(f"run {run.run_id} has no trained adapter yet ({paths.adapter}): train it first")
    items, evals = collect_items(run, args.prompt, args.prompts_file)
    adhoc = bool(args.prompt or args.prompts_file)
    from launcher.job.metrics import get_metrics

    metrics = get_metrics(run.inference.metric) if evals else []
    if not items and not evals and not args.merge:
        raise ConfigError(
            "nothing to do: no prompts (inference.prompts / prompts_file / eval_file, or --prompt) and no --merge"
        )

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .adapter_check import check_base_unchanged, probe_logits
    from .model_source import load_model, resolve_model

    started = time.time()
    cuda = torch.cuda.is_available()
    with_base = run.inference.compare_base and not args.no_base
    source = resolve_model(run)
    summary: dict[str, Any] = {
        "run_id": run.run_id,
        "prompts": len(items),
        "eval_examples": len(evals),
        "load_in_4bit": run.inference.load_in_4bit,
        "max_new_tokens": run.inference.max_new_tokens,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    everything = items + evals
    if everything:
        # The adapter folder holds the tokenizer the run trained with.
        tokenizer = AutoTokenizer.from_pretrained(paths.adapter)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation continues from the end of each row
        log(f"loading base model {run.model.name_or_path} ({'4-bit' if run.inference.load_in_4bit else 'unquantized'})")
        model = load_model(run, source, cuda=cuda, load_in_4bit=run.inference.load_in_4bit)
        model.eval()
        # The adapter is attached before anything is generated, and the base model answers
        # through `disable_adapter()`: one model, wrapped once, so an answer never depends on
        # what ran before it (a forward before wrapping is what broke issue #8). Loading the
        # base twice would also work, at twice the memory of a 7B model.
        probe = _probe_text(run, tokenizer, everything[0].prompt)
        reference = probe_logits(model, tokenizer, probe)
        model = PeftModel.from_pretrained(model, str(paths.adapter))
        model.eval()
        summary["base_check_max_logit_diff"] = check_base_unchanged(model, tokenizer, probe, reference)
        if with_base:
            with model.disable_adapter():
                summary["base_seconds"] = round(answer_all(run, "base", model, tokenizer, everything), 2)
        summary["tuned_seconds"] = round(answer_all(run, "tuned", model, tokenizer, everything), 2)
        del model
        if evals:
            summary.update(score(evals, metrics))
        paths.inference.mkdir(parents=True, exist_ok=True)
        # Ad-hoc prompts (--prompt / --prompts-file) never replace the inference job's results.
        results_name = f"adhoc-{time.strftime('%Y%m%dT%H%M%S')}.jsonl" if adhoc else "results.jsonl"
        atomic_write_text(
            paths.inference / results_name,
            "".join(json.dumps(i.record(), ensure_ascii=False) + "\n" for i in everything),
        )
        print_table(items, evals, with_base)
        for entry in summary.get("metrics", []):
            base = f"base {entry['base']:.2f} → " if "base" in entry else ""
            log(f"metric {entry['name']}: {base}tuned {entry['tuned']:.2f} ({entry['n']} held-out examples)")
    if args.merge:
        summary["merged"] = str(merge(run, source, paths))
    if adhoc:
        log(f"answers written to {paths.inference / results_name}")
        return EXIT_OK
    summary["seconds"] = round(time.time() - started, 2)
    if everything:  # what `qlaunch evaluate` compares to skip a run already scored (issue #29)
        from launcher.job.grid_evaluation import eval_set

        summary["eval_set"] = eval_set(run)
    write_json(paths.inference / "summary.json", summary)
    emit(make_event("infer_end", _trained_steps(paths), summary=summary), paths.progress, sys.stdout)
    return EXIT_OK


def score(evals: list[Item], metrics) -> dict[str, Any]:
    """summary.json's `metric` (the headline, the first one) and `metrics` (all):
    {name, base, tuned, n} with mean scores. Each result row keeps the headline's score."""
    scored = []
    for index, (name, metric) in enumerate(metrics):
        entry: dict[str, Any] = {"name": name, "n": len(evals)}
        for who in evals[0].answers:
            values = [metric(item.answers[who], item.reference) for item in evals]
            entry[who] = round(sum(values) / len(values), 4)
            if index == 0:
                for item, value in zip(evals, values):
                    item.scores[who] = value
        scored.append(entry)
    return {"metric": scored[0], "metrics": scored}


def merge(run: RunConfig, source, paths: RunPaths) -> Path:
    """Adapter merged into an unquantized float16 base (merging into 4-bit weights would
    re-quantize them), on the CPU so that a 7B model needs host memory, not GPU memory."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .checkpoints import publish
    from .model_source import load_model

    log("merging the adapter into a float16 copy of the base model")
    base = load_model(run, source, cuda=False, load_in_4bit=False, dtype=torch.float16)
    merged = PeftModel.from_pretrained(base, str(paths.adapter)).merge_and_unload()
    target = paths.root / "merged"
    staging = paths.root / f".tmp-merged-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(paths.adapter).save_pretrained(staging)
    publish(staging, target)
    log(f"merged model written to {target}")
    return target


def _trained_steps(paths: RunPaths) -> int:
    from launcher.job.storage import read_json

    return int((read_json(paths.metrics) or {}).get("global_step", 0))


if __name__ == "__main__":
    sys.exit(main())
