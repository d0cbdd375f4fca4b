"""Successive halving decided by the runs themselves (search.strategy: asha), for real on CPU.

A 9-run grid of the tiny model (learning rate × LoRA r, three runs with a learning rate too small
to learn anything, all three first in the grid's own order), trained once as a plain grid and once with asha through `qlaunch run`: the asha grid
trains at most 40% of the plain grid's tokens, its best run is the plain grid's best, and the
runs it never stopped end with the plain grid's adapters, bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from training_support import events, job_env, tail, wait_until

from launcher.grid import plan
from launcher.job.search import read_ledger, run_decisions
from launcher.job.storage import RunPaths

STEPS = 27
# Learning rates whose ranking holds at every rung on this model (measured: eval loss at steps
# 3, 9, 27); within the best one r = 2 leads at each. 1e-7 moves nothing: three identical results.
GRID = {"train.learning_rate": [1e-7, 1e-4, 1e-3], "lora.r": [2, 4, 8]}
SECTIONS = {
    "train": {"max_steps": STEPS, "save_steps": 1000, "logging_steps": 1, "per_device_train_batch_size": 2},
    "lora": {"dropout": 0.0},
    "dataset": {"path": "data.jsonl", "test_size": 0.25},
    "inference": {"enabled": False},
    "grid": GRID,
}
ASHA = {"strategy": "asha", "first_rung_steps": 1, "reduction_factor": 3}  # rungs at 1, 3, 9 of 27


def qlaunch(*args: str, home: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**job_env(), "QLAUNCH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def metrics(run) -> dict:
    return json.loads(RunPaths.of(run).metrics.read_text())


def best(runs) -> str:
    finished = [r for r in runs if not metrics(r).get("pruned")]
    return min(finished, key=lambda r: metrics(r)["eval_loss"]).run_id


@pytest.fixture(scope="module")
def grids(tmp_path_factory, tiny_experiment):
    folder = tmp_path_factory.mktemp("asha")
    plain = tiny_experiment(folder / "plain", **SECTIONS)
    asha = tiny_experiment(folder / "asha", **SECTIONS, search=ASHA)
    for path in (plain, asha):
        result = qlaunch("run", str(path), home=folder / "home")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return plan(plain), plan(asha), result.stdout, folder / "home"


@pytest.mark.slow
def test_asha_trains_at_most_40_percent_of_the_tokens_and_keeps_the_best_run(grids):
    plain, asha, output, _ = grids
    assert [r.run_id for r in plain.runs] == [r.run_id for r in asha.runs]  # search is not in the run id
    plain_tokens = sum(metrics(r)["train_tokens"] for r in plain.runs)
    asha_tokens = sum(metrics(r)["train_tokens"] for r in asha.runs)
    pruned = [r.run_id for r in asha.runs if metrics(r).get("pruned")]
    print(f"asha: {asha_tokens} of {plain_tokens} tokens ({asha_tokens / plain_tokens:.0%}); pruned {len(pruned)} of 9")
    assert asha_tokens <= 0.40 * plain_tokens
    assert best(asha.runs) == best(plain.runs)
    assert "stopped early by asha: pruned @ rung" in output
    # Every run recorded its rung-0 result in the shared ledger; decisions are in each run folder.
    ledger = read_ledger(Path(asha.runs[0].run_dir).parent)
    assert set(ledger[0]) == {r.run_id for r in asha.runs}
    for run_id in pruned:
        run = next(r for r in asha.runs if r.run_id == run_id)
        decision = metrics(run)["pruned"]
        assert run_decisions(Path(run.run_dir))[decision["rung"]]["prune"] is True
        assert events(run, "end")[-1]["status"] == "pruned"
        assert (RunPaths.of(run).adapter / "adapter_model.safetensors").is_file()  # its rung adapter, kept


@pytest.mark.slow
def test_runs_asha_never_stopped_have_the_plain_grids_adapters_bit_for_bit(grids):
    from safetensors.torch import load_file

    plain, asha, _, _ = grids
    survivors = [r for r in asha.runs if not metrics(r).get("pruned")]
    assert survivors
    for run in survivors:
        twin = next(r for r in plain.runs if r.run_id == run.run_id)
        ours, theirs = (
            load_file(RunPaths.of(run).adapter / "adapter_model.safetensors"),
            load_file(RunPaths.of(twin).adapter / "adapter_model.safetensors"),
        )
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert (ours[name] - theirs[name]).abs().max().item() == 0.0, name


@pytest.mark.slow
def test_status_says_where_each_run_was_stopped(grids):
    _, asha, _, home = grids
    path = Path(asha.source)
    result = qlaunch("status", str(path), "--json", home=home)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    pruned = {r["run_id"]: r["pruned"] for r in document["runs"] if r.get("pruned")}
    assert pruned and all(p["rank"] > p["keep"] for p in pruned.values())
    table = qlaunch("status", str(path), home=home)
    assert "pruned @ rung" in table.stdout


@pytest.mark.slow
def test_a_run_stopped_right_after_its_decision_resumes_with_that_decision(tmp_path, tiny_plan):
    result = tiny_plan(tmp_path, **{**SECTIONS, "grid": {}}, search=ASHA)
    run = result.runs[0]
    paths = RunPaths.of(run)
    # Three better results already at rung 0: this run ranks 4th of 4 and only the best continues.
    rung0 = Path(run.run_dir).parent / "asha" / "rung-0"
    rung0.mkdir(parents=True)
    for n in range(3):
        (rung0 / f"other{n}.json").write_text(json.dumps({"value": 0.001 * n}))
    log = tmp_path / "train.log"
    job = subprocess.Popen(
        [sys.executable, "-m", "training.launch", str(paths.config)],
        cwd=tmp_path,
        env=job_env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    decisions = paths.root / "asha.json"
    wait_until(lambda: decisions.exists() or job.poll() is not None, 300, "the rung-0 decision", interval=0.005)
    job.send_signal(signal.SIGTERM)  # right after it recorded the decision
    first = job.wait(timeout=300)
    assert first in (0, 75), tail(log)
    decided = run_decisions(paths.root)
    assert decided[0]["prune"] is True and decided[0]["rank"] == 4
    if first == 75:  # preempted before it could finish as pruned: the next attempt does, without training
        again = subprocess.run(
            [sys.executable, "-m", "training.launch", str(paths.config)],
            cwd=tmp_path,
            env=job_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "before it was preempted" in again.stdout + again.stderr
    assert run_decisions(paths.root) == decided  # decided once
    assert metrics(run)["pruned"]["rung"] == 0 and metrics(run)["global_step"] == 1
    assert max(e["step"] for e in events(run, "step")) == 1  # nothing trained past the rung
    assert {p.name for p in rung0.iterdir()} == {"other0.json", "other1.json", "other2.json", f"{run.run_id}.json"}


def _decide_at_once(args) -> None:
    run_yaml, barrier, value = args
    from launcher.job.experiment_file import load_run_config
    from training.asha import decide

    barrier.wait()
    decide(load_run_config(run_yaml), 0, value)


def test_two_runs_reaching_a_rung_at_the_same_moment_both_land_in_the_ledger(tmp_path, tiny_plan):
    runs = tiny_plan(tmp_path, **{**SECTIONS, "grid": {"train.learning_rate": [1e-3, 2e-3]}}, search=ASHA).runs
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(2)
    for _ in range(3):
        folder = Path(runs[0].run_dir).parent / "asha"
        shutil.rmtree(folder, ignore_errors=True)
        with context.Pool(2) as pool:
            pool.map(_decide_at_once, [(str(RunPaths.of(r).config), barrier, 1.0 + i) for i, r in enumerate(runs)])
        assert read_ledger(folder.parent)[0] == {runs[0].run_id: 1.0, runs[1].run_id: 2.0}


@pytest.mark.parametrize(
    "search, train, expected",
    [
        ({"strategy": "asha", "first_rung_steps": 3}, {}, "dataset.test_size"),
        ({"strategy": "asha", "first_rung_steps": 30}, {"max_steps": 27}, "first_rung_steps 30 is not below"),
        ({"strategy": "asha", "first_rung_steps": 3, "reduction_factor": 1}, {}, "search.reduction_factor"),
        ({"strategy": "asha"}, {}, "exactly one of first_rung_steps or first_rung_tokens"),
        ({"strategy": "asha", "first_rung_steps": 3, "metric": "eval_mean_token_accuracy"}, {}, "search.mode: max"),
        ({"strategy": "asha", "first_rung_steps": 3, "metric": "eval_accuracy"}, {}, "search.metric"),
        ({"strategy": "asha", "first_rung_steps": 3, "metric": "accuracy"}, {}, "search.metric"),
    ],
)
def test_bad_search_settings_are_one_error_before_anything_starts(tmp_path, tiny_experiment, search, train, expected):
    dataset = {"test_size": 0.25} if expected != "dataset.test_size" else {}
    path = tiny_experiment(tmp_path, search=search, train=train, dataset={"path": "data.jsonl", **dataset})
    result = qlaunch("check", str(path), home=tmp_path / "home", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error") or ".yaml:" in line]) >= 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_report_shows_each_rung_the_runs_it_stopped_and_the_gpu_time_saved(grids, tmp_path):
    _, asha, _, home = grids
    result = qlaunch("report", str(asha.source), "-o", str(tmp_path / "report"), "--json", home=home)
    assert result.returncode == 0, result.stderr
    search = json.loads(result.stdout)["search"]
    assert search["strategy"] == "asha" and search["rungs"][0]["rung"] == 0
    assert len(search["rungs"][0]["results"]) == 9
    assert sorted(search["pruned"]) == sorted({rid for rung in search["rungs"] for rid in rung["stopped"]})
    assert search["trained_steps"] < 0.4 * search["full_steps"] and search["saved_gpu_hours"] >= 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Successive halving" in markdown and "rung 0 (1 step)" in markdown
    assert markdown.count("pruned @ rung") == len(search["pruned"])  # the runs table says where each stopped
    assert "Successive halving" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_audit_finishes_the_stopped_runs_as_the_plain_grid_and_says_the_winner_stands(grids, tmp_path):
    plain, asha, _, home = grids
    pruned = [r for r in asha.runs if metrics(r).get("pruned")]
    result = qlaunch("report", str(asha.source), "--audit", "-o", str(tmp_path / "report"), "--json", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    audit = json.loads(result.stdout)["search"]["audit"]
    # Each stopped run, finished from its rung checkpoint, ends where the plain grid's run ended.
    assert audit["finished"] == {
        r.run_id: metrics(next(t for t in plain.runs if t.run_id == r.run_id))["eval_loss"] for r in pruned
    }
    assert audit["winner"] == audit["plain_winner"] == best(plain.runs) and audit["regret"] == 0
    assert "no pruning regret" in (tmp_path / "report" / "report.md").read_text()
    assert all(metrics(r).get("pruned") for r in pruned)  # the grid's own runs are left as they were
    again = qlaunch("report", str(plain.source), "--audit", home=home)
    assert again.returncode == 2 and "--audit needs search.strategy: asha" in again.stderr


@pytest.mark.slow
def test_a_rung_can_compare_token_accuracy_higher_is_better(tmp_path, tiny_plan):
    """search.metric eval_mean_token_accuracy (trl's, on the held-out examples), mode max: three
    better accuracies recorded already, so this run ranks 4th of 4 and stops at rung 0."""
    search = {**ASHA, "metric": "eval_mean_token_accuracy", "mode": "max"}
    run = tiny_plan(tmp_path, **{**SECTIONS, "grid": {}}, search=search).runs[0]
    rung0 = Path(run.run_dir).parent / "asha" / "rung-0"
    rung0.mkdir(parents=True)
    for n in range(3):
        (rung0 / f"other{n}.json").write_text(json.dumps({"value": 0.97 + 0.01 * n}))
    result = subprocess.run(
        [sys.executable, "-m", "training.launch", str(RunPaths.of(run).config)],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    decision = metrics(run)["pruned"]
    assert (decision["metric"], decision["rung"], decision["rank"]) == ("eval_mean_token_accuracy", 0, 4)
    assert 0.0 <= decision["value"] < 0.97
    assert metrics(run)["eval_mean_token_accuracy"] == decision["value"]  # what report --audit compares
    assert read_ledger(Path(run.run_dir).parent)[0][run.run_id] == decision["value"]


def test_audit_of_a_slurm_grid_does_not_train_on_the_login_node_unless_told(tmp_path, tiny_experiment):
    path = tiny_experiment(tmp_path, **SECTIONS, backend="slurm", search=ASHA)
    result = qlaunch("report", str(path), "--audit", home=tmp_path / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not as slurm jobs" in result.stderr and "srun --gres=gpu:1 --pty qlaunch report" in result.stderr
    assert result.stderr.rstrip().endswith("--audit --here")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("audit"))
