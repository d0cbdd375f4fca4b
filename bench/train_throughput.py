"""Training throughput and memory of QLoRA profiles, side by side, through the project's own trainer.

    python bench/train_throughput.py                      # Llama-2-7B shapes, on a GPU
    python bench/train_throughput.py --tiny --steps 4     # toy shapes, runs on a CPU (debugging)
    python bench/train_throughput.py --profiles notebook,t4,t4+liger --steps 40
    python bench/train_throughput.py --profiles t4,13b:t4,13b:t4-lean   # 13B shapes: prefix 13b:

Profiles run in the order given; `--deadline S` starts no profile after S seconds, and a second
invocation with the same --work skips the profiles already measured there (so one list can span
two device commands of 10 minutes each).

It builds Llama-2-7B-shaped weights at random (once, no download), a word-level tokenizer and a
dataset whose example lengths are log-normal (median ~300 tokens, up to 2048), then for each
profile writes an experiment file, expands it with `launcher.grid.plan`, and runs
`python -m training.sft run.yaml` in its own process (a fresh CUDA context, so each peak is that
profile's own). From each run's metrics.json and progress.jsonl it prints one table:

    tokens/s     non-padding tokens per second, steady state (the first steps are warm-up)
    s/step       seconds per optimizer step
    peak alloc / peak reserved   torch.cuda.max_memory_allocated / _reserved over the run
    preflight    `qlaunch preflight`'s estimate of peak reserved for the profile's config
    MFU          4·N FLOPs per token (N = base parameters; frozen base: no weight gradients)
                 over the GPU's dense fp16 peak
    loss         mean loss of the last 5 steps (and of the first step)

Results also go to <out>/results.json and <out>/results.md (default /tmp/qlaunch-bench/out).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import profiles as bench_profiles  # noqa: E402
import synthetic  # noqa: E402
import yaml  # noqa: E402

from launcher import preflight  # noqa: E402
from launcher.grid import plan  # noqa: E402
from launcher.job.progress import read_events  # noqa: E402
from launcher.job.storage import RunPaths, read_json, write_run_config  # noqa: E402

# Dense fp16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_FP16 = [
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("T4", 65e12),
    ("V100", 125e12),
]
DEFAULT_PROFILES = "notebook,t4"


def split_profile(name: str) -> tuple[str, str]:
    """'13b:t4-lean' → ('13b', 't4-lean'); no prefix → 7b."""
    size, _, profile = name.rpartition(":")
    return size or "7b", profile


def peak_flops(device: str) -> float | None:
    for name, flops in PEAK_FP16:
        if name in device:
            return flops
    return None


def experiment_for(
    name: str, recipe: dict, model_dir: Path, data: Path, work: Path, steps: int, gpu_type: str, tiny: bool = False
) -> Path:
    train = {
        **recipe.get("train", {}),
        "max_steps": steps,
        "logging_steps": 1,
        "save_steps": 1_000_000,
        "save_total_limit": 1,
    }
    if tiny:  # a CPU step over 12k tokens takes a minute: shrink the token budgets, keep the levers
        train["max_seq_length"] = min(train.get("max_seq_length") or 1024, 256)
        train["per_device_train_batch_size"] = min(train.get("per_device_train_batch_size", 4), 4)
    experiment = {
        "name": f"bench-{name.replace('+', '-')}".lower()[:40].rstrip("-"),
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": str(data), "format": "text"},
        "prompt": {"template": "none"},
        "quantization": recipe.get("quantization", {}),
        "lora": recipe.get("lora", {}),
        "train": train,
        "storage": {"root": str(work / "runs")},
        "resources": {"gpu_type": gpu_type},
        "inference": {"enabled": False},
    }
    path = work / "experiments" / f"{experiment['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def run_profile(name: str, experiment: Path, work: Path, timeout: float) -> dict:
    """Train one profile in its own process; its metrics, losses and preflight estimate."""
    (run,) = plan(experiment).runs
    paths = RunPaths.of(run)
    shutil.rmtree(paths.root, ignore_errors=True)  # a completed run would not train again
    write_run_config(run)
    log = work / "logs" / f"{experiment.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(
                [sys.executable, "-m", "training.sft", str(paths.config)],
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = summarize(name, run, paths, time.time() - started)
    result["exit"] = code
    result["log"] = str(log)
    if code != 0:
        result["log_tail"] = log.read_text()[-3000:]
    return result


def summarize(name: str, run, paths: RunPaths, wall: float) -> dict:
    steps = [e for e in read_events(paths.progress) if e.get("event") == "step"]
    metrics = read_json(paths.metrics) or {}
    estimate = preflight.estimate_run(run)
    out = {
        "profile": name,
        "run_id": run.run_id,
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "preflight_bytes": estimate.estimated_peak_bytes,
        "preflight_fits": estimate.fits,
        "tokens_per_step_budget": estimate.tokens_per_step,
        "peak_allocated_bytes": metrics.get("peak_memory_allocated_bytes"),
        "peak_reserved_bytes": metrics.get("peak_memory_reserved_bytes"),
        "device": metrics.get("device"),
        "train_runtime": metrics.get("train_runtime"),
        "train_tokens": metrics.get("train_tokens"),
        "losses": [e.get("loss") for e in steps],
        "step_times": [e.get("time") for e in steps],
        "step_tokens_per_second": [e.get("tokens_per_second") for e in steps],
        "train": run.train.model_dump(mode="json"),
        "lora_target_modules": run.lora.target_modules,
    }
    if len(steps) >= 3:
        warmup = min(3, len(steps) // 3)
        tokens = seconds = 0.0
        for previous, event in zip(steps[warmup - 1 :], steps[warmup:]):
            dt = event["time"] - previous["time"]
            tokens += (event.get("tokens_per_second") or 0.0) * dt
            seconds += dt
        if seconds > 0:
            out["tokens_per_second"] = tokens / seconds
            out["seconds_per_step"] = seconds / (len(steps) - warmup)
            out["tokens_per_step"] = tokens / (len(steps) - warmup)
        losses = [loss for loss in out["losses"] if loss is not None]
        out["loss_first"] = losses[0]
        out["loss_last5"] = statistics.fmean(losses[-5:])
        out["loss_last5_sd"] = statistics.pstdev(losses[-5:])
    return out


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "profile",
        "tokens/s",
        "× notebook",
        "s/step",
        "tokens/step",
        "peak alloc GiB",
        "peak reserved GiB",
        "preflight GiB (err)",
        "MFU",
        "loss@1",
        "loss@N (last 5)",
    ]
    base = next((r.get("tokens_per_second") for r in results if r["profile"] == "notebook"), None)
    rows = []
    for r in results:
        tps = r.get("tokens_per_second")
        flops = peak_flops(r.get("device") or "")
        n_params = r.get("n_params") or 0
        reserved = r.get("peak_reserved_bytes")
        err = f" ({100 * (r['preflight_bytes'] / reserved - 1):+.0f}%)" if reserved else ""
        rows.append(
            [
                r["profile"] + ("" if r.get("exit") == 0 else f" [exit {r.get('exit')}]"),
                "-" if tps is None else f"{tps:,.0f}",
                "-" if not (tps and base) else f"{tps / base:.2f}×",
                "-" if "seconds_per_step" not in r else f"{r['seconds_per_step']:.3f}",
                "-" if "tokens_per_step" not in r else f"{r['tokens_per_step']:,.0f}",
                gib(r.get("peak_allocated_bytes")),
                gib(reserved),
                gib(r["preflight_bytes"]) + err,
                "-" if not (tps and flops) else f"{100 * 4 * n_params * tps / flops:.1f}%",
                "-" if "loss_first" not in r else f"{r['loss_first']:.3f}",
                "-" if "loss_last5" not in r else f"{r['loss_last5']:.3f} ±{r['loss_last5_sd']:.3f}",
            ]
        )
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column == "profile" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profiles",
        default=DEFAULT_PROFILES,
        help=f"comma-separated, from: {', '.join(bench_profiles.profiles())} (default {DEFAULT_PROFILES})",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per profile (default 40)")
    parser.add_argument("--tiny", action="store_true", help="toy model shapes (CPU debugging)")
    parser.add_argument("--examples", type=int, default=3000, help="dataset size (default 3000)")
    parser.add_argument("--gpu-type", default="t4", help="resources.gpu_type the preflight estimate targets")
    parser.add_argument("--work", default="/tmp/qlaunch-bench", help="model, data and run folders")
    parser.add_argument("--out", help="where results.json / results.md go (default: <work>/out)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per profile")
    parser.add_argument(
        "--deadline", type=float, default=0, help="seconds after which no further profile starts (0: none)"
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=6,
        help="steps of a discarded first run that fills the Triton/CUDA caches (default 6)",
    )
    args = parser.parse_args(argv)

    available = bench_profiles.profiles()
    chosen = [name.strip() for name in args.profiles.split(",") if name.strip()]
    unknown = [
        name
        for name in chosen
        if split_profile(name)[1] not in available or split_profile(name)[0] not in synthetic.SHAPES
    ]
    if unknown:
        parser.error(f"unknown profile(s) {unknown}; known: {', '.join(available)}")
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work / "out"
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    results_file = work / "results.json"  # survives between invocations with the same --work
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    done = {r["profile"]: r for r in previous.get("results", []) if r.get("exit") == 0 and r.get("steps") == args.steps}
    results = [done[name] for name in chosen if name in done]
    if results:
        print(f"already measured in {work}: {', '.join(r['profile'] for r in results)}", flush=True)
    data = None
    warmed = False
    shapes: dict[str, preflight.ModelShape] = {}
    for name in chosen:
        if name in done:
            continue
        size, profile = split_profile(name)
        if args.deadline and time.time() - started > args.deadline:
            print(f"--- {name}: not started (past --deadline {args.deadline:.0f}s); run again to continue", flush=True)
            continue
        size = "tiny" if args.tiny else size
        model_dir = work / f"llama2-{size}"
        if size not in shapes:
            # Its own process: the parent never holds a CUDA context while the profiles run.
            subprocess.run(
                [sys.executable, str(Path(__file__).parent / "synthetic.py"), str(model_dir), "--shape", size],
                check=True,
            )
            config = json.loads((model_dir / "config.json").read_text())
            shapes[size] = preflight.shape_from_config(config)
            if data is None:
                lengths = {"median": 60, "longest": 512} if args.tiny else {}
                data = synthetic.write_dataset(work / "data.jsonl", args.examples, config["vocab_size"], **lengths)
            print(
                f"{size} model and data ready at {time.time() - started:.0f}s: "
                f"{shapes[size].num_params / 1e9:.2f}B parameters, {args.examples} examples",
                flush=True,
            )
            if args.deadline and time.time() - started > args.deadline:
                print(
                    f"--- {name}: not started (past --deadline {args.deadline:.0f}s); run again to continue", flush=True
                )
                continue
        if args.warmup_steps and not warmed:
            # The first training process on a fresh machine compiles Triton kernels (trl's chunked
            # loss) for each new shape specialisation; whichever profile ran first paid for it (the
            # notebook measured 1.5x slower that way). A short discarded run pays it for everyone.
            warmed = True
            what, recipe = available[profile]
            experiment = experiment_for(
                "warmup", recipe, model_dir, data, work, args.warmup_steps, args.gpu_type, args.tiny
            )
            print(f"--- warm-up ({name}, {args.warmup_steps} steps, discarded)", flush=True)
            warm = run_profile("warmup", experiment, work, args.timeout)
            if warm.get("exit") != 0:
                print(warm.get("log_tail", ""), flush=True)
        what, recipe = available[profile]
        experiment = experiment_for(
            name.replace(":", "-"), recipe, model_dir, data, work, args.steps, args.gpu_type, args.tiny
        )
        print(f"--- {name}: {what} (at {time.time() - started:.0f}s)", flush=True)
        result = run_profile(name, experiment, work, args.timeout)
        result["what"] = what
        result["n_params"] = shapes[size].num_params
        result["shape"] = size
        results.append(result)
        print(
            json.dumps(
                {
                    k: v
                    for k, v in result.items()
                    if k not in ("losses", "train", "log_tail", "step_times", "step_tokens_per_second")
                }
            ),
            flush=True,
        )
        if "log_tail" in result:
            print(result["log_tail"], flush=True)
        record = {
            "date": _dt.date.today().isoformat(),
            "command": " ".join(sys.argv),
            "steps": args.steps,
            "tiny": args.tiny,
            "gpu_type": args.gpu_type,
            "results": results,
        }
        for target in (results_file, out / "results.json"):
            target.write_text(json.dumps(record, indent=1))
    results.sort(key=lambda r: chosen.index(r["profile"]))

    device = next((r["device"] for r in results if r.get("device")), "cpu")
    header, rows = table_rows(results)
    title = (
        f"Llama-2 shapes, {args.steps} steps per profile, on {device} "
        f"({_dt.date.today().isoformat()}); preflight targets a {args.gpu_type}"
    )
    (out / "results.md").write_text(f"{title}\n\n{markdown(header, rows)}\n")
    print_table(header, rows, title)
    return 0 if all(r.get("exit") == 0 for r in results) and len(results) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
