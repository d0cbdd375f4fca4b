"""A job's log, as `qlaunch logs` shows it, holds what the job did (issue #33, 10): no alarming
"pip install kernels" first line from bitsandbytes, each logged step once, no tqdm `\\r` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.job.progress import PROGRESS_PREFIX


def qlaunch(*args, home: Path):
    env = {**os.environ, "QLAUNCH_HOME": str(home), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=900
    )


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.slow  # trains the tiny model (about a minute on 2 cores)
def test_train_and_infer_logs_have_no_library_noise(tiny_experiment, tmp_path):
    path = tiny_experiment(tmp_path / "exp")
    home = tmp_path / "home"
    result = qlaunch("run", path, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = json.loads(qlaunch("plan", path, "--json", home=home).stdout)["runs"][0]["run_id"]
    train = qlaunch("logs", run_id, "-e", path, home=home)
    infer = qlaunch("logs", run_id, "-e", path, "--infer", home=home)
    assert train.returncode == 0 and infer.returncode == 0, train.stderr + infer.stderr
    for log in (train.stdout, infer.stdout):
        assert "pip install kernels" not in log
        assert "\r" not in log, "progress bars in a log file"
        if cpu_has_avx512_bf16():  # where bitsandbytes tries the kernel: said once, in our words
            assert log.count("nothing to install, qlaunch does not use it") == 1, log[:2000]
        assert len(log) < 20_000, f"{len(log)} characters"
    assert train.stdout.startswith("[qlaunch] ")

    lines = train.stdout.splitlines()
    steps = [json.loads(line.split(PROGRESS_PREFIX, 1)[1]) for line in lines if line.startswith(PROGRESS_PREFIX)]
    steps = [e for e in steps if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))  # logging_steps 1, max_steps 8: once each
    assert all(e["grad_norm"] is not None for e in steps)  # what the trainer's own dict line had
    assert not [line for line in lines if line.startswith("{'loss'") or "'train_runtime'" in line]


def test_the_filter_and_the_switches_without_training(monkeypatch):
    """What the slow test sees in a log, in-process: the warning is dropped and said once in our
    words; off a terminal the progress-bar switches are on, and a user's own setting wins."""
    import io
    import logging

    from training import log_noise

    for name in log_noise.PROGRESS_BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "0")  # the user's choice
    said, records = [], []
    logger = logging.getLogger(log_noise.BNB_CPU_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        log_noise.quiet_job_logs(stream=io.StringIO(), say=said.append)
        for _ in range(2):
            logger.warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                "you already `pip install kernels`",
                "No module named 'kernels'",
            )
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert said == [log_noise.KERNELS_NOTE]
    assert [r.getMessage() for r in records] == ["something else"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TQDM_DISABLE"] == "0"
