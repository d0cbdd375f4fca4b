"""The export job: `python -m training.export <run.yaml or run dir> --out DIR [--merge]
[--gguf f16|q8_0]`.

Without `--merge`: the run's adapter (+ tokenizer), a model card (README.md) and export.json.

With `--merge`, the adapter is merged twice and each candidate checked against the model that was
trained and evaluated (the 4-bit base + the adapter, unmerged) on the run's eval prompts:

  float16            the adapter merged into the original float16 weights W. The adapter was
                     trained against dequant(NF4(W)), not W, so this adds the quantisation error
                     W - dequant(NF4(W)) back into every layer (transformers#31293, peft#2321).
  dequantized-4bit   the adapter merged into dequant(NF4(W)) stored as float16: what the adapter
                     saw in training, up to float16 rounding of the sum.

Each is compared on teacher-forced tokens (prompt + the unmerged model's greedy answer: per-token
logit difference, max and mean, and top-1 agreement) and generatively (greedy answers identical
to the unmerged model's, and the headline metric on `inference.eval_file`). A candidate passes
when its greedy answers agree on at least ANSWER_AGREEMENT of the prompts and its headline metric
is within max(METRIC_TOLERANCE, 1/n) of the unmerged model's (one held-out answer may flip on a
near-tie of two tokens); the passing candidate with the smaller mean logit difference ships.
Neither passes: exit 1 with the numbers, nothing published.

`--gguf` also writes `<name>-<type>.gguf` (training.gguf_export) and checks it the same way:
loaded back with transformers' GGUF loader, its greedy answers against the merged model's.

Everything is written into a temp folder beside DIR and renamed into place at the end: a failed
or refused export leaves nothing behind. Exit codes: 0 done, 2 bad input, 1 failed or refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.job import __version__
from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.storage import RunPaths, atomic_write_text, read_json, write_json

from .entrypoint import EXIT_CONFIG, EXIT_OK, input_errors, load_run_or_report, log, run_with_token
from .hub_files import apply_offline_env

ANSWER_AGREEMENT = 0.9
METRIC_TOLERANCE = 0.02
EXPORT_FILE = "export.json"
CANDIDATES = ("dequantized-4bit", "float16")


class MergeRefused(Exception):
    """Neither merge is close enough to the unmerged model (the message has the numbers)."""


@dataclass
class Probe:
    """What a model did on the check prompts."""

    answers: list[str]
    logits: list[Any]  # per prompt: (tokens, vocab) float32 tensors over prompt + reference answer
    metric: float | None


# --- measuring ----------------------------------------------------------------------------------


def _texts(run: RunConfig, tokenizer, prompts: list[str]) -> list[str]:
    from .formatting import format_prompt, without_leading_bos

    return [without_leading_bos(format_prompt(run, tokenizer, p), tokenizer) for p in prompts]


def probe(
    run: RunConfig, model, tokenizer, prompts: list[str], references: list[str | None], forced: list[str] | None, metric
) -> Probe:
    """Greedy answers, the headline metric on the prompts with a reference, and the logits on
    each prompt followed by `forced` (the unmerged model's answers; None: this model's own)."""
    import torch

    from .infer import generate

    answers = generate(run, model, tokenizer, prompts)
    device = next(model.parameters()).device
    logits = []
    for text, answer in zip(_texts(run, tokenizer, prompts), forced or answers):
        ids = tokenizer(text + answer, return_tensors="pt").to(device)
        with torch.no_grad():
            logits.append(model(**ids).logits[0].float().cpu())
    scored = [(a, r) for a, r in zip(answers, references) if r is not None]
    value = round(sum(metric(a, r) for a, r in scored) / len(scored), 4) if scored and metric else None
    return Probe(answers, logits, value)


def compare(reference: Probe, candidate: Probe, n_scored: int) -> dict[str, Any]:
    import torch

    diffs = [(a - b).abs() for a, b in zip(reference.logits, candidate.logits)]
    top1 = [(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(reference.logits, candidate.logits)]
    agree = sum(a == b for a, b in zip(reference.answers, candidate.answers)) / len(reference.answers)
    result: dict[str, Any] = {
        "max_logit_diff": round(max(float(d.max()) for d in diffs), 6),
        "mean_logit_diff": round(float(torch.cat([d.flatten() for d in diffs]).mean()), 6),
        "top1_token_agreement": round(float(torch.cat(top1).mean()), 4),
        "answer_agreement": round(agree, 4),
        "metric": candidate.metric,
    }
    tolerance = max(METRIC_TOLERANCE, 1 / n_scored) if n_scored else 0.0
    metric_ok = (
        reference.metric is None
        or candidate.metric is None
        or abs(candidate.metric - reference.metric) <= tolerance + 1e-9
    )
    result["passes"] = bool(agree >= ANSWER_AGREEMENT and metric_ok)
    return result


# --- building the candidates --------------------------------------------------------------------


def _tokenizer(paths: RunPaths):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.adapter)  # the run's own tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def unmerged(run: RunConfig, source, paths: RunPaths, cuda: bool):
    """The model that was trained and evaluated: the 4-bit base + the adapter."""
    from peft import PeftModel

    from .model_source import load_model

    base = load_model(run, source, cuda=cuda, load_in_4bit=run.quantization.load_in_4bit)
    return PeftModel.from_pretrained(base, str(paths.adapter)).eval()


def merged(run: RunConfig, source, paths: RunPaths, base_kind: str):
    """The adapter merged into a float16 base (on the CPU: a 7B merge needs host memory)."""
    import torch
    from peft import PeftModel

    from .model_source import load_model

    if base_kind == "float16":
        base = load_model(run, source, cuda=False, load_in_4bit=False, dtype=torch.float16)
    else:
        # dequant(NF4(W)): bitsandbytes' own dequantisation of the weights the adapter trained on.
        base = load_model(run, source, cuda=False, load_in_4bit=True).dequantize().to(torch.float16)
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
        base.is_quantized = False
        base.hf_quantizer = None
    model = PeftModel.from_pretrained(base, str(paths.adapter)).merge_and_unload()
    model.config.dtype = torch.float16
    return model


def _evaluated(model, cuda: bool):
    """The shipped float16 weights, on the GPU as they are, or computed in float32 on a CPU
    (float16 matmuls there are slow and less exact than a GPU's)."""
    import torch

    return model.to("cuda").eval() if cuda else model.to(torch.float32).eval()


# --- the export ---------------------------------------------------------------------------------


def export(run: RunConfig, paths: RunPaths, out: Path, merge: bool, gguf_type: str | None) -> dict[str, Any]:
    if not paths.training_completed():
        raise ConfigError(f"run {run.run_id} has no trained adapter yet ({paths.adapter}): train it first")
    started = time.time()
    staging = out.parent / f".tmp-{out.name}-{int(started * 1000)}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        record = _build(run, paths, staging, merge, gguf_type)
        record["seconds"] = round(time.time() - started, 2)
        write_json(staging / EXPORT_FILE, record)
        atomic_write_text(staging / "README.md", model_card(run, paths, record))
        for item in staging.iterdir():
            item.chmod(0o644)  # atomic writes are private (mkstemp); an export is for others to read
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _build(run: RunConfig, paths: RunPaths, staging: Path, merge: bool, gguf_type: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "run_id": run.run_id,
        "experiment": run.name,
        "run_dir": str(paths.root),
        "qlaunch_version": __version__,
        "base_model": run.model.name_or_path,
        "gguf_file": run.model.gguf_file,
        "overrides": run.overrides,
        "created_at": round(time.time(), 3),
        "kind": "merged" if merge else "adapter",
    }
    summary = read_json(paths.inference / "summary.json") or {}
    if isinstance(summary.get("metric"), dict):
        record["eval_metric"] = summary["metric"]
    if not merge:
        for item in paths.adapter.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        record["files"] = sorted(p.name for p in staging.iterdir())
        return record

    import torch

    from launcher.job.metrics import get_metrics

    from .infer import collect_items
    from .model_source import resolve_model

    items, evals = collect_items(run, [], None)
    checked = evals + items
    if not checked:
        raise ConfigError("the merge check needs prompts: set inference.eval_file (or inference.prompts)")
    prompts = [i.prompt for i in checked]
    references = [i.reference for i in checked]
    name, metric = get_metrics(run.inference.metric)[0] if evals else (None, None)
    cuda = torch.cuda.is_available()
    source = resolve_model(run)
    tokenizer = _tokenizer(paths)

    log(f"merge check: the unmerged model (4-bit base + adapter) on {len(prompts)} prompts")
    model = unmerged(run, source, paths, cuda)
    reference = probe(run, model, tokenizer, prompts, references, None, metric)
    del model
    check: dict[str, Any] = {
        "prompts": len(prompts),
        "eval_examples": len(evals),
        "metric_name": name,
        "unmerged_metric": reference.metric,
        "answer_agreement_required": ANSWER_AGREEMENT,
        "metric_tolerance": max(METRIC_TOLERANCE, 1 / len(evals)) if evals else None,
        "candidates": {},
    }
    candidates = staging / ".candidates"
    for kind in CANDIDATES:
        log(f"merge check: the adapter merged into the {kind} base")
        model = merged(run, source, paths, kind)
        model.save_pretrained(candidates / kind)
        result = compare(
            reference,
            probe(run, _evaluated(model, cuda), tokenizer, prompts, references, reference.answers, metric),
            len(evals),
        )
        check["candidates"][kind] = result
        log(f"merge check {kind}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
        del model
    passing = [k for k in CANDIDATES if check["candidates"][k]["passes"]]
    record["merge_check"] = check
    if not passing:
        raise MergeRefused("neither merge is close enough to the unmerged model: " + json.dumps(check["candidates"]))
    chosen = min(passing, key=lambda k: check["candidates"][k]["mean_logit_diff"])
    check["chosen"] = chosen
    for item in (candidates / chosen).iterdir():
        item.rename(staging / item.name)
    shutil.rmtree(candidates)
    _tokenizer(paths).save_pretrained(staging)
    if gguf_type:
        record["gguf"] = gguf_check(run, staging, gguf_type, tokenizer, prompts, references, metric, len(evals))
    record["files"] = sorted(p.name for p in staging.iterdir())
    return record


def gguf_check(run: RunConfig, staging: Path, gguf_type: str, tokenizer, prompts, references, metric, n_scored):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf_export import write_gguf

    filename = f"{run.name}-{run.run_id}-{gguf_type}.gguf"
    log(f"writing {filename}")
    write_gguf(staging, staging / filename, gguf_type, f"{run.name}-{run.run_id}")
    # Both on the CPU in float32: the check is of the file, the same on every machine.
    merged_model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    reference = probe(run, merged_model, tokenizer, prompts, references, None, metric)
    del merged_model
    loaded = AutoModelForCausalLM.from_pretrained(staging, gguf_file=filename, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=filename)
    texts = _texts(run, tokenizer, prompts)
    same_ids = all(tokenizer(t).input_ids == gguf_tokenizer(t).input_ids for t in texts)
    result = compare(reference, probe(run, loaded, tokenizer, prompts, references, reference.answers, metric), n_scored)
    result.update(
        file=filename,
        type=gguf_type,
        bytes=(staging / filename).stat().st_size,
        tokenizer_ids_equal=same_ids,
        merged_metric=reference.metric,
    )
    log("gguf check: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    if not (result["passes"] and same_ids):
        raise MergeRefused(f"the GGUF file does not answer like the merged model: {json.dumps(result)}")
    return result


# --- the model card -----------------------------------------------------------------------------


def model_card(run: RunConfig, paths: RunPaths, record: dict[str, Any]) -> str:
    merged_kind = record["kind"] == "merged"
    from launcher.job.hub import is_hub_model

    lines = [
        "---",
        *([f"base_model: {run.model.name_or_path}"] if is_hub_model(run.model.name_or_path, run) else []),
        f"library_name: {'transformers' if merged_kind else 'peft'}",
        "tags: [qlaunch, qlora, lora]",
        "---",
        f"# {run.name} / {run.run_id}",
        "",
        f"QLoRA fine-tune of `{run.model.name_or_path}`"
        + (f" (`{run.model.gguf_file}`)" if run.model.gguf_file else "")
        + f", trained with qlaunch {record['qlaunch_version']} (experiment `{run.name}`, run `{run.run_id}`). "
        + (
            "The adapter merged into the base model (float16)."
            if merged_kind
            else "The LoRA adapter alone; load it on the base model with `PeftModel.from_pretrained`."
        ),
        "",
        "## Recipe",
        "",
        f"- grid values of this run: {', '.join(f'`{k}={v}`' for k, v in run.overrides.items()) or 'none (one run)'}",
        f"- LoRA r={run.lora.r}, alpha={run.lora.alpha}, dropout={run.lora.dropout}, "
        f"target modules: {run.lora.target_modules or 'peft default'}",
        f"- base loaded in 4-bit: {run.quantization.load_in_4bit} ({run.quantization.bnb_4bit_quant_type}, "
        f"double quant {run.quantization.bnb_4bit_use_double_quant})",
        f"- learning rate {run.train.learning_rate}, {run.train.lr_scheduler_type} schedule, max_steps "
        f"{run.train.max_steps}, epochs {run.train.num_train_epochs}, batch {run.train.per_device_train_batch_size}"
        f" × accumulation {run.train.gradient_accumulation_steps}, max length {run.train.max_seq_length}",
        f"- dataset `{run.dataset.path}`, prompt template `{run.prompt.template}`",
    ]
    metric = record.get("eval_metric")
    if metric:
        base = f"{metric['base']:.2f} → " if "base" in metric else ""
        lines += [
            "",
            f"**{metric['name']}** on {metric['n']} held-out examples: base {base}tuned {metric['tuned']:.2f}.",
        ]
    check = record.get("merge_check")
    if check:
        lines += [
            "",
            "## Merge check",
            "",
            f"Each merge compared with the unmerged model (4-bit base + adapter, what was trained and evaluated) "
            f"on {check['prompts']} prompts. Shipped: **{check.get('chosen')}**.",
            "",
            "| merged into | max logit diff | mean logit diff | top-1 tokens agree | greedy answers agree | "
            f"{check['metric_name'] or 'metric'} (unmerged {check['unmerged_metric']}) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for kind, result in check["candidates"].items():
            lines.append(
                f"| {kind} | {result['max_logit_diff']:.4g} | {result['mean_logit_diff']:.4g} | "
                f"{result['top1_token_agreement']:.3f} | {result['answer_agreement']:.3f} | {result['metric']} |"
            )
    gguf = record.get("gguf")
    if gguf:
        lines += [
            "",
            "## GGUF",
            "",
            f"`{gguf['file']}` ({gguf['type']}), loaded back with transformers: greedy answers agree with the "
            f"merged model's on {gguf['answer_agreement']:.0%} of the prompts, max logit diff "
            f"{gguf['max_logit_diff']:.4g}.",
            "",
            f"    llama-cli -m {gguf['file']} -cnv",
            "",
            f"Ollama: a Modelfile with `FROM ./{gguf['file']}`, then `ollama create {run.name} -f Modelfile`.",
        ]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run's run.yaml, or its run folder")
    parser.add_argument("--out", required=True, help="the export folder (replaced when it exists)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter, checked against the unmerged model")
    parser.add_argument("--gguf", choices=("f16", "q8_0"), help="also a GGUF file of the merged model")
    args = parser.parse_args(argv)
    if args.gguf and not args.merge:
        parser.error("--gguf needs --merge")
    run = load_run_or_report(args.run)
    if run is None:
        return EXIT_CONFIG
    apply_offline_env(run)
    if input_errors(run, args.run, ("model", "inference") if args.merge else ("model",)):
        return EXIT_CONFIG

    def work() -> int:
        out = Path(args.out).expanduser().resolve()
        record = export(run, RunPaths.of(run), out, args.merge, args.gguf)
        log(f"exported {record['kind']} of run {run.run_id} to {out}")
        return EXIT_OK

    return run_with_token(run, work, refusals=(MergeRefused,))


if __name__ == "__main__":
    sys.exit(main())
