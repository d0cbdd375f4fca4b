"""Per-run inference vs one grid evaluation job, on CPU, on the quickstart's model and prompts.

    python bench/eval_grid.py --work /tmp/evalgrid-bench                # train (once), then measure
    python bench/eval_grid.py --work /tmp/evalgrid-bench --phase measure  # measure only

Two grids of SmolLM2-135M-Instruct (the quickstart's model, 4-bit NF4, max_new_tokens 32, greedy):
  quickstart   examples/quickstart.yaml as shipped: 2 runs (learning rate 1e-3, 2e-3), 30 steps,
               its 40 held-out prompts + 2 free prompts
  grid8        the same recipe, 8 runs (learning rate 5e-4..3e-3 × lora.r 8/16), 5 steps each
               (fewer steps only to keep the bench's training short; evaluation cost does not
               depend on how long an adapter trained), the same 40 + 2 prompts

For each grid, both ways the jobs really run, as subprocesses started like the local backend
starts them: N × `python -m training.infer <run>` (today's per-run inference), then one
`python -m training.evaluate_grid` over the N runs. Measured: wall time of each, how many times
the base model was loaded, and every run's metrics and answers compared one by one. Writes
<work>/results-<grids>.json and prints a Markdown table (bench/RESULTS.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRIDS = {
    "quickstart": {},
    "grid8": {
        "train": {"max_steps": 5},
        "grid": {"train.learning_rate": [5.0e-4, 1.0e-3, 2.0e-3, 3.0e-3], "lora.r": [8, 16]},
    },
}


def experiment_file(work: Path, name: str) -> Path:
    data = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    data["name"] = name
    data["dataset"]["path"] = str(REPO / "examples/data/train.jsonl")
    data["inference"]["eval_file"] = str(REPO / "examples/data/eval.jsonl")
    data["storage"] = {"root": str(work / "runs")}
    for section, values in GRIDS[name].items():
        data[section] = values if section == "grid" else {**data[section], **values}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def environment() -> dict[str, str]:
    from launcher.jobspec import launcher_environment

    return {**launcher_environment(), "CUDA_VISIBLE_DEVICES": ""}


def train(path: Path, work: Path) -> None:
    log = work / f"{path.stem}.train.log"
    with open(log, "w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "launcher.cli", "run", str(path), "--no-infer"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**environment(), "QLAUNCH_HOME": str(work / "home")},
        )
    if code != 0:
        raise SystemExit(f"training {path.stem} failed: see {log}")


def timed(command: list[str], log: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=environment())
    seconds = time.perf_counter() - started
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}): see {log}")
    return seconds, text


def snapshot(run) -> dict:
    from launcher.job.storage import RunPaths

    paths = RunPaths.of(run)
    summary = json.loads((paths.inference / "summary.json").read_text())
    rows = [json.loads(line) for line in (paths.inference / "results.jsonl").read_text().splitlines()]
    return {"metrics": summary["metrics"], "rows": rows}


def measure(path: Path, work: Path, rows_per_batch: int | None = None) -> dict:
    from launcher.grid import plan
    from launcher.job.storage import RunPaths

    runs = plan(path).runs
    for run in runs:
        assert RunPaths.of(run).training_completed(), f"{run.run_id} is not trained: run the train phase"
    logs = work / "logs" / path.stem
    logs.mkdir(parents=True, exist_ok=True)

    per_run, per_run_loads, before = 0.0, 0, {}
    load = [round(os.getloadavg()[0], 1)]  # the 2 cores are shared: how busy they were
    for run in runs:
        shutil.rmtree(RunPaths.of(run).inference, ignore_errors=True)
        seconds, text = timed(
            [sys.executable, "-m", "training.infer", str(RunPaths.of(run).config)], logs / f"{run.run_id}.infer.log"
        )
        per_run += seconds
        per_run_loads += text.count("loading base model")
        before[run.run_id] = snapshot(run)

    listing = logs / "runs.txt"
    listing.write_text("".join(str(RunPaths.of(run).config) + "\n" for run in runs))
    for run in runs:
        shutil.rmtree(RunPaths.of(run).inference, ignore_errors=True)
    load.append(round(os.getloadavg()[0], 1))
    extra = ["--rows-per-batch", str(rows_per_batch)] if rows_per_batch else []
    grid, text = timed(
        [sys.executable, "-m", "training.evaluate_grid", str(listing), *extra], logs / "evaluate_grid.log"
    )
    grid_loads = text.count("loading base model")
    load.append(round(os.getloadavg()[0], 1))

    runs_out = []
    for run in runs:
        after = snapshot(run)
        old, new = before[run.run_id], after
        differing = [
            {"prompt": a["prompt"][:60], "who": who, "per_run": a.get(who), "grid": b.get(who)}
            for a, b in zip(old["rows"], new["rows"])
            for who in ("base", "tuned")
            if a.get(who) != b.get(who)
        ]
        runs_out.append(
            {
                "run_id": run.run_id,
                "overrides": run.overrides,
                "metrics_per_run": {m["name"]: [m.get("base"), m["tuned"]] for m in old["metrics"]},
                "metrics_grid": {m["name"]: [m.get("base"), m["tuned"]] for m in new["metrics"]},
                "answers": len(old["rows"]) * 2,
                "answers_differing": differing,
            }
        )
    return {
        "grid": path.stem,
        "runs": len(runs),
        "per_run_seconds": round(per_run, 1),
        "per_run_base_loads": per_run_loads,
        "grid_seconds": round(grid, 1),
        "grid_base_loads": grid_loads,
        "rows_per_batch": rows_per_batch or "default",
        "speedup": round(per_run / grid, 2),
        "load_average_1min": load,  # before per-run, before grid, after grid
        "results": runs_out,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| grid | runs | per-run inference (wall, base loads) | grid evaluation (wall, base loads) | speedup | metrics equal | answers differing |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        equal = sum(x["metrics_per_run"] == x["metrics_grid"] for x in r["results"])
        differing = sum(len(x["answers_differing"]) for x in r["results"])
        answers = sum(x["answers"] for x in r["results"])
        lines.append(
            f"| {r['grid']} | {r['runs']} | {r['per_run_seconds']} s, {r['per_run_base_loads']} | "
            f"{r['grid_seconds']} s, {r['grid_base_loads']} | **{r['speedup']}×** | {equal} of {r['runs']} runs | "
            f"{differing} of {answers} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlaunch-eval-grid-bench"))
    parser.add_argument("--phase", choices=["all", "train", "measure"], default="all")
    parser.add_argument("--grids", default="quickstart,grid8")
    parser.add_argument("--rows-per-batch", type=int, help="the grid job's --rows-per-batch (default: its own)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: no spinning OpenMP threads
    paths = [experiment_file(args.work, name) for name in args.grids.split(",")]
    if args.phase in ("all", "train"):
        for path in paths:
            train(path, args.work)
    if args.phase == "train":
        return 0
    results = [measure(path, args.work, args.rows_per_batch) for path in paths]
    (args.work / f"results-{args.grids.replace(',', '-')}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    for r in results:
        for x in r["results"]:
            for d in x["answers_differing"]:
                print(
                    f"{r['grid']} {x['run_id']} {d['who']}: {d['prompt']!r}: per-run {d['per_run']!r} grid {d['grid']!r}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
