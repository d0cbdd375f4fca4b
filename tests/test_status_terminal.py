"""`qlaunch status` and `qlaunch run` where people read them (#33, findings 6, 7, 10): an
80-column terminal, a pipe, TERM=dumb, a CI log. Through the real commands; the run folders are
written as the jobs leave them (tests/recorded_runs.py), except the one `qlaunch run` test.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import recorded_runs as rr

from launcher.grid import plan
from launcher.json_output import StatusDocument

GRID = {  # 2 × 2 × 3 × 2 = 24 runs, a list-valued key among them
    "lora.r": [8, 16],
    "lora.alpha": [16, 32],
    "train.learning_rate": [1e-4, 2e-4, 3e-4],
    "lora.target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]],
}
PROGRESS_COLUMNS = ("step", "loss", "elapsed", "eta", "restarts", "infer")


def environment(home, **extra):
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "TERM")}
    env.update(QLAUNCH_HOME=str(home), OMP_NUM_THREADS="1", **extra)
    return env


def qlaunch(*args, home, **extra):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        env=environment(home, **extra),
        timeout=300,
    )


@pytest.fixture
def grid24(tmp_path):
    """6 runs completed, 4 running (this test process stands in for their trainer), 14 never started."""
    path = rr.experiment(tmp_path / "exp", GRID)
    runs = rr.runs(path)
    for run in runs[:6]:
        rr.trained(run, [1.5, 1.3, 1.2, 1.1], eval_loss=1.0)
    for run in runs[6:10]:
        rr.running(run, step=3, total=10, loss=1.25)
    return path, runs


def row_cells(text: str, run_id: str) -> list[str]:
    """A run's row, cell by cell, a wrapped cell's lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if run_id in line)
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if re.search(r"[0-9a-f]{10}", line) or not line.startswith("│"):
            break
        block.append(line)
    columns = zip(*(line.strip("│").split("│") for line in block))
    return [" ".join(" ".join(parts).split()) for parts in columns]


def test_status_at_80_columns_keeps_every_grid_key_or_names_what_it_hid(grid24, tmp_path):
    path, runs = grid24
    result = qlaunch("status", str(path), home=tmp_path / "home", COLUMNS="80")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert max(map(len, text.splitlines())) <= 80, text
    assert "…" not in text and "'q_proj'" not in text, text  # lists as values, not Python reprs
    table, _, caption = text.partition("hidden to fit 80 columns:")
    caption = " ".join(caption.split())
    for key in GRID:  # every grid key is a column, its dotted name whole (over two lines here)
        section, rest = key.split(".", 1)
        assert re.search(rf"{re.escape(section)}\.\s*┃.*\n.*{re.escape(rest)}", table) or key in caption, key
    for run in runs:  # …and every run shows its own values: no two rows look alike
        row = row_cells(table, run.run_id)
        for key, value in run.overrides.items():
            shown = (
                f"[{', '.join(value)}]"
                if isinstance(value, list)
                else f"{value:g}"
                if isinstance(value, float)
                else str(value)
            )
            assert shown in row, (key, shown, row)
    header = table.split("┡", 1)[0]
    for column in PROGRESS_COLUMNS:  # shown, or named under the table with the way to see it
        assert column in header or column in caption, (column, text)
    if caption:
        assert "qlaunch status --wide" in caption
    assert "not started" in table and "unknown" not in table  # never-submitted runs say so

    wide = qlaunch("status", str(path), "--wide", home=tmp_path / "home", COLUMNS="80").stdout
    assert "hidden" not in wide and all(column in wide for column in PROGRESS_COLUMNS)
    assert all(key in wide for key in GRID)  # one line each when there is room

    piped = qlaunch("status", str(path), home=tmp_path / "home").stdout  # a pipe: the whole table
    assert "hidden" not in piped and all(key in piped for key in GRID) and "[q_proj, k_proj, v_proj, o_proj]" in piped

    planned = qlaunch("plan", str(path), home=tmp_path / "home", COLUMNS="200").stdout  # the plan table too
    assert "[q_proj, k_proj, v_proj, o_proj]" in planned and "'q_proj'" not in planned

    document = StatusDocument.model_validate_json(qlaunch("status", str(path), "--json", home=tmp_path / "home").stdout)
    never = [r for r in document.runs if r.run_id in {run.run_id for run in runs[10:]}]
    assert {(r.state, r.detail) for r in never} == {("unknown", "not started")}  # the JSON state is unchanged


def test_a_dead_local_run_says_that_run_resumes_it(tmp_path):
    path = rr.experiment(tmp_path / "exp", {"train.learning_rate": [1e-4, 2e-4]})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the trainer died without qlaunch noticing
    run = rr.runs(path)[0]
    rr.running(run, step=3, total=10, loss=1.25, pid=gone.pid)
    text = qlaunch("status", str(path), home=tmp_path / "home", COLUMNS="200").stdout
    assert "failed (process gone; `qlaunch run` resumes it)" in " ".join(text.split()), text


def read_until(fd: int, count: int, marker: bytes, limit: float = 120.0) -> bytes:
    """Read `fd` until `marker` has appeared `count` times (or the limit: then the test fails on
    what was read, not on a time)."""
    data = b""
    deadline = time.monotonic() + limit
    while data.count(marker) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other end closed
                break
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.parametrize("where", ["pipe", "TERM=dumb"])
def test_status_watch_off_a_terminal_prints_one_table_per_refresh(grid24, tmp_path, where):
    path, runs = grid24
    command = [sys.executable, "-m", "launcher.cli", "status", str(path), "--watch", "--interval", "0.2"]
    if where == "pipe":
        job = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(tmp_path / "home"),
            start_new_session=True,
        )
        fd = job.stdout.fileno()
    else:  # a real terminal that cannot move the cursor
        parent, child = pty.openpty()
        job = subprocess.Popen(
            command,
            stdout=child,
            stderr=child,
            stdin=child,
            start_new_session=True,
            env=environment(tmp_path / "home", TERM="dumb", COLUMNS="200"),
        )
        os.close(child)
        fd = parent
    try:
        output = read_until(fd, 4, b"recorded \xc2\xb7 local \xc2\xb7 24 runs")
    finally:
        os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=60)
    text = output.decode()
    tables = text.split("recorded · local · 24 runs")[1:]
    assert len(tables) >= 4, text[-3000:]
    for table in tables[
        :3
    ]:  # each refresh (before the last, still being read) is a whole table: every run, its state, its step
        for run in runs:
            assert run.run_id in table, table
        assert table.count("running") >= 4
        # a pipe gets the whole table; rich takes a dumb terminal for 80 columns: said under it
        assert table.count("3/10") == 4 if where == "pipe" else "hidden to fit 80 columns" in " ".join(table.split())


def test_plain_progress_lines_name_step_loss_and_eta(tmp_path):
    """What `qlaunch run` prints off a terminal, built from the same events status reads."""
    from launcher.backends import get_backend
    from launcher.status_view import ProgressLines, collect

    path = rr.experiment(tmp_path / "exp", {"train.learning_rate": [1e-4, 2e-4]})
    first, second = rr.runs(path)
    rr.running(first, step=3, total=10, loss=1.25)
    p = plan(path)
    lines = ProgressLines(seconds=0)
    printed = lines(collect(p, get_backend("local")))
    assert len(printed) == 1 and printed[0].startswith(f"{first.run_id} train.learning_rate=0.0001 step 3/10 (30%)")
    assert re.search(r"loss 1\.2500 .*elapsed 0:\d\d ETA 1:\d\d$", printed[0]), printed[0]
    assert lines(collect(p, get_backend("local"))) == []  # the same step is not printed twice


@pytest.mark.slow
def test_run_off_a_terminal_prints_progress_lines(tiny_experiment, tmp_path):
    """A CI log or a nohup file: `qlaunch run` into a pipe prints plain step/total, loss and ETA
    lines while the job trains, not only `started` and `completed` (#33, finding 7)."""
    path = tiny_experiment(tmp_path / "exp", train={"max_steps": 8, "save_steps": 8})
    result = qlaunch("run", str(path), "--no-infer", home=tmp_path / "home", QLAUNCH_PROGRESS_SECONDS="0")
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = plan(path).runs[0].run_id
    progress = [
        line for line in result.stdout.splitlines() if re.search(rf"{run_id} .*step \d+/8 \(\d+%\) loss \d", line)
    ]
    assert progress, result.stdout
    assert all("ETA" in line and "elapsed" in line for line in progress)
    assert "\x1b[" not in result.stdout  # plain text for a log file
