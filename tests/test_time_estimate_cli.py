"""Time estimates for what the project ships (issue #33, 10): a hub dataset is counted once
`qlaunch prefetch` has put it into the shared cache, and a CPU run shows its steps and tokens.
Through the real `qlaunch plan`, against the local fake hub."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fake_hub import FakeHub
from tests.test_prefetch import ROWS, rows_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = "NousResearch/Llama-2-7b-chat-hf"  # a shape the estimate knows by name
DATA = "qlaunch-test/counting"


def qlaunch(folder: Path, *args, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        PYTHONPATH=str(ROOT),
        QLAUNCH_HOME=str(folder / "qlaunch-home"),
        COLUMNS="250",
        HF_HOME=str(folder / "user-hf-home"),
        **({"HF_ENDPOINT": endpoint} if endpoint else {}),
    )
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=300,
    )


def estimate_rows(stdout: str) -> dict[str, list[str]]:
    """run id → the cells of its time-estimate row."""
    table = stdout.split("time estimate", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if cells and re.fullmatch(r"[0-9a-f]{10}", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_a_prefetched_hub_dataset_gets_a_time_estimate(tmp_path):
    hub = FakeHub().start()
    try:
        hub.commit(
            "model",
            MODEL,
            {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "model.safetensors": b"0" * 1000},
        )
        rows = ROWS * 10  # 240 examples
        hub.commit("dataset", DATA, {"data/train.jsonl": rows_file(rows), "README.md": b"# counting\n"})
        experiment = tmp_path / "exp.yaml"
        experiment.write_text(
            yaml.safe_dump(
                {
                    "name": "hubtime",
                    "model": {"name_or_path": MODEL},
                    "dataset": {"path": DATA, "format": "instruction"},
                    "resources": {"gpu_type": "t4"},
                    "storage": {"root": str(tmp_path / "runs")},
                    "train": {
                        "num_train_epochs": 2,
                        "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 1,
                    },
                }
            )
        )
        before = qlaunch(tmp_path, "plan", experiment)
        assert before.returncode == 0, before.stderr
        (row,) = estimate_rows(before.stdout).values()
        assert row[2] == "?" and "qlaunch prefetch" in row[-1], row

        fetched = qlaunch(tmp_path, "prefetch", experiment, endpoint=hub.endpoint)
        assert fetched.returncode == 0, fetched.stderr
    finally:
        hub.stop()
    after = qlaunch(tmp_path, "plan", experiment)  # no hub: the cache and the pins record only
    assert after.returncode == 0, after.stderr
    (row,) = estimate_rows(after.stdout).values()
    assert row[2] == "120", row  # 240 examples × 2 epochs / 4 per step
    assert row[5] != "?" and "min" in row[5] or " h" in row[5], row


def test_the_quickstart_shows_its_steps_and_tokens_on_cpu(tmp_path):
    result = qlaunch(tmp_path, "plan", ROOT / "examples" / "quickstart.yaml")
    assert result.returncode == 0, result.stderr
    rows = estimate_rows(result.stdout)
    assert len(rows) == 2
    for cells in rows.values():
        assert cells[1] == "CPU" and cells[2] == "30" and cells[4].endswith("k"), cells
    # said once, under the table, not wrapped into every row at 80 columns
    assert result.stdout.count("CPU time is not modelled") == 1, result.stdout
