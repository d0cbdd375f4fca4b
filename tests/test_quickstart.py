"""The README's first command is a test: `make quickstart`, as a new user runs it, on a fresh copy
of the checkout (same example, real SmolLM2, both grid runs, inference included).

It asserts the README's promise — every run's fine-tuned answers clearly beat the base model's —
and that a tuned answer does not depend on whether the base model answered first (issue #8:
on CPUs with AVX512-BF16 it did, and every tuned answer was garbage)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)  # the virtual environment running the suite


def _fresh_copy(target: Path) -> Path:
    """The tracked files only, as a fresh clone has them (no run outputs, no .venv)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    checkout = _fresh_copy(tmp_path_factory.mktemp("checkout"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QLAUNCH_HOME")}
    env["QLAUNCH_HOME"] = str(tmp_path_factory.mktemp("qlaunch-home"))  # the run index
    # VENV= reuses the suite's environment (already built by `make setup`).
    done = subprocess.run(
        ["make", "quickstart", f"VENV={VENV}"], cwd=checkout, env=env, capture_output=True, text=True, timeout=1800
    )
    return checkout, done


@pytest.mark.slow
def test_make_quickstart_tunes_both_runs_well_past_the_base_model(quickstart):
    checkout, done = quickstart
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = sorted(p for p in (checkout / "examples/qlaunch-runs/quickstart").iterdir() if (p / "run.yaml").is_file())
    assert len(runs) == 2
    for run in runs:
        assert (run / "adapter" / "adapter_config.json").is_file()
        summary = json.loads((run / "inference" / "summary.json").read_text())
        headline = summary["metric"]
        assert headline["name"] == "json_match" and headline["n"] == 40
        assert headline["tuned"] >= 0.5, (run.name, summary["metrics"])
        assert headline["tuned"] >= headline["base"] + 0.5, (run.name, summary["metrics"])
        environment = json.loads((run / "attempts" / "1" / "environment.json").read_text())
        assert environment["versions"]["transformers"] and environment["cpu_model"]
        # the final lines the user reads: each run's metric, base → tuned
        printed = " ".join(done.stdout.split())  # rich wraps long lines when not on a terminal
        assert re.search(rf"{run.name} .*json_match base \d\.\d\d → tuned \d\.\d\d on 40 held-out prompts", printed)


@pytest.mark.slow
def test_tuned_answers_do_not_depend_on_the_base_model_answering_first(quickstart):
    checkout, done = quickstart
    assert done.returncode == 0
    run = sorted(p for p in (checkout / "examples/qlaunch-runs/quickstart").iterdir() if (p / "run.yaml").is_file())[0]
    rows = [json.loads(line) for line in (run / "inference" / "results.jsonl").read_text().splitlines()]
    # The same prompts in the same order (so the same batches), tuned model only.
    prompts = checkout / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows))
    alone = subprocess.run(
        [sys.executable, "-m", "training.infer", str(run), "--no-base", "--prompts-file", str(prompts)],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    adhoc = sorted((run / "inference").glob("adhoc-*.jsonl"))[-1]
    answers = [json.loads(line)["tuned"] for line in adhoc.read_text().splitlines()]
    assert answers == [row["tuned"] for row in rows]
    assert "base" in rows[0]  # the job's own answers did come after the base model's
