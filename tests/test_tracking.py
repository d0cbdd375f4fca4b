"""Experiment trackers on a real grid: one tracked run per grid run across a preempted attempt.

Real TensorBoard event files, W&B in offline mode, MLflow against a real tracking server on
127.0.0.1; a 2-run grid, each run stopped once (SIGTERM, and SIGKILL after a checkpoint so
that steps are replayed) and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from training_support import REPO, events, job_env, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths
from training.tracking import tracked_run_name, wandb_run_id

pytestmark = pytest.mark.slow

STEPS = 12
SAVE_EVERY = 4
SECRETS = {"WANDB_API_KEY": "wandbkey0123456789abcdef0123456789abcdef", "HF_TOKEN": "hf_notarealtoken0123456789ABCDEF"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (the full `mlflow` package; jobs need only mlflow-skinny) on 127.0.0.1, or,
    where only the client is installed (CI installs the `tracking` extra: mlflow-skinny), a real
    MLflow file store: the same client calls, the same one-run-per-grid-run checks."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    try:
        import mlflow.server  # noqa: F401
    except ImportError:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3.18 wants file stores named
        yield (folder / "mlruns").as_uri()
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "ab")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--default-artifact-root",
            str(folder / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    try:
        wait_until(lambda: _healthy(url) or server.poll() is not None, 180, "the MLflow server", interval=0.5)
        assert server.poll() is None, tail(folder / "server.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def _tracked_env(mlflow_url: str) -> dict[str, str]:
    env = job_env()
    env.update(SECRETS)  # as a user's submitting environment would have them
    env["MLFLOW_TRACKING_URI"] = mlflow_url
    env.pop("WANDB_MODE", None)  # tracking.wandb_mode: offline decides
    return env


def _last_step(run) -> int:
    steps = events(run, "step")
    return steps[-1]["step"] if steps else 0


@pytest.fixture(scope="module")
def tracked_grid(tmp_path_factory, tiny_plan, mlflow_server):
    folder = tmp_path_factory.mktemp("tracked")
    plan = tiny_plan(
        folder,
        dataset={"path": "data.jsonl", "test_size": 0.25},
        train={
            "max_steps": STEPS,
            "save_steps": SAVE_EVERY,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": SAVE_EVERY,
        },
        tracking={"report_to": ["tensorboard", "wandb", "mlflow"], "wandb_mode": "offline", "tags": ["ci"]},
        kubernetes={"secrets": [{"env": "WANDB_API_KEY", "name": "wandb", "key": "api-key"}]},
        grid={"train.learning_rate": [1.0e-4, 2.0e-4]},
    )
    env = _tracked_env(mlflow_server)
    for run, stop in zip(plan.runs, (signal.SIGTERM, signal.SIGKILL)):
        paths = RunPaths.of(run)
        command = [sys.executable, "-m", "training.sft", str(paths.config)]
        with open(paths.train_log, "ab") as log:
            job = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
            # SIGKILL after a checkpoint: the next attempt replays the steps logged since then.
            wait_until(lambda: _last_step(run) >= SAVE_EVERY + 2 or job.poll() is not None, 300, "step 6")
            job.send_signal(stop)
            code = job.wait(timeout=300)
            assert code == (EXIT_PREEMPTED if stop == signal.SIGTERM else -signal.SIGKILL), tail(paths.train_log)
            assert (
                subprocess.call(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600) == 0
            ), tail(paths.train_log)
        assert events(run, "end")[-1]["step"] == STEPS
    return plan


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`: a 7-byte header, then LevelDB-log blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _experiment_dir(plan) -> Path:
    return plan.storage_root / plan.experiment.name


def test_tensorboard_shows_one_continuous_curve_per_run_after_resume(tracked_grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    root = _experiment_dir(tracked_grid) / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == sorted(tracked_run_name(r) for r in tracked_grid.runs)
    assert {p.name.split("-", 1)[1] for p in root.iterdir()} == {"learning_rate=0.0001", "learning_rate=0.0002"}
    for run in tracked_grid.runs:
        folder = root / tracked_run_name(run)
        reader = EventAccumulator(str(folder))
        reader.Reload()
        assert [e.step for e in reader.Scalars("train/loss")] == list(range(1, STEPS + 1))
        assert [e.step for e in reader.Scalars("eval/loss")] == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))

    # The killed run really did log steps twice on disk: the reader hides them (purge_step).
    killed = root / tracked_run_name(tracked_grid.runs[1])
    raw = defaultdict(int)
    for path in killed.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    raw[event.step] += 1
    assert raw[SAVE_EVERY + 1] == 2


def test_wandb_offline_keeps_one_run_per_grid_run_across_attempts(tracked_grid):
    folders = defaultdict(list)
    for path in (_experiment_dir(tracked_grid) / "wandb").glob("offline-run-*"):
        folders[path.name.split("-", 3)[3]].append(path)  # offline-run-<time>-<run id>
    expected = {wandb_run_id(run): run for run in tracked_grid.runs}
    assert set(folders) == set(expected)
    for run_id, paths in folders.items():
        run = expected[run_id]
        assert len(paths) == 2  # both attempts wrote into the same W&B run id
        # (the SIGKILLed attempt's wandb-core dies before it flushes: its file may be empty)
        records = [r for path in paths for r in wandb_records(next(path.glob("run-*.wandb")))]
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
        config = {
            item.key: json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for item in r.config.update
        }
        assert config["grid"] == {"train.learning_rate": run.train.learning_rate}
        assert config["qlaunch"]["run_id"] == run.run_id and config["qlaunch"]["tracking"]["tags"] == ["ci"]
        steps = {
            json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "history"
            for item in r.history.item
            if "/".join(item.nested_key or [item.key]) == "train/global_step"
        }
        assert max(steps) == STEPS


def test_mlflow_keeps_one_run_per_grid_run_across_attempts(tracked_grid, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(tracked_grid.experiment.name)
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["qlaunch.run_id"] for r in found) == sorted(r.run_id for r in tracked_grid.runs)
    for mlflow_run in found:
        run = next(r for r in tracked_grid.runs if r.run_id == mlflow_run.data.tags["qlaunch.run_id"])
        assert mlflow_run.info.run_name == tracked_run_name(run)
        assert mlflow_run.info.status == "FINISHED"
        loss_steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")]
        assert sorted(set(loss_steps)) == list(range(1, STEPS + 1))
        eval_steps = sorted({m.step for m in client.get_metric_history(mlflow_run.info.run_id, "eval_loss")})
        assert eval_steps == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
        assert float(mlflow_run.data.params["learning_rate"]) == run.train.learning_rate


def test_eval_loss_is_in_the_progress_events(tracked_grid):
    for run in tracked_grid.runs:
        evals = events(run, "eval")
        assert {e["step"] for e in evals} >= {SAVE_EVERY, 2 * SAVE_EVERY, STEPS}
        assert all(e["eval_loss"] > 0 for e in evals)


def test_no_secret_in_any_rendered_file_or_log(tracked_grid, mlflow_server, tmp_path):
    env = _tracked_env(mlflow_server)
    for backend in ("slurm", "kubernetes"):
        out = tmp_path / backend
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "render",
                str(tracked_grid.source),
                "-b",
                backend,
                "-o",
                str(out),
                "--skip-input-checks",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert not any(secret in result.stdout + result.stderr for secret in SECRETS.values())
    manifest = "".join(p.read_text() for p in (tmp_path / "kubernetes").rglob("*.yaml"))
    assert "WANDB_API_KEY" in manifest and "secretKeyRef" in manifest  # the key travels as a reference
    leaked = []
    for root in (tmp_path, _experiment_dir(tracked_grid)):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaked += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    assert not leaked


def test_a_run_asha_stops_is_closed_as_pruned_in_every_tracker(tmp_path, tiny_plan, mlflow_server):
    """Issue #30: the tracked run of a pruned run says so (state, rung), not just "finished"."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = tiny_plan(
        tmp_path,
        dataset={"path": "data.jsonl", "test_size": 0.25},
        train={"max_steps": 9, "save_steps": 1000, "logging_steps": 1},
        search={"strategy": "asha", "first_rung_steps": 1, "reduction_factor": 3},
        tracking={"report_to": ["tensorboard", "wandb", "mlflow"], "wandb_mode": "offline"},
    )
    run = plan.runs[0]
    rung0 = Path(run.run_dir).parent / "asha" / "rung-0"
    rung0.mkdir(parents=True)
    for n in range(3):  # three better results: this run ranks 4th and is stopped at rung 0
        (rung0 / f"other{n}.json").write_text(json.dumps({"value": 0.001 * n}))
    paths = RunPaths.of(run)
    result = subprocess.run(
        [sys.executable, "-m", "training.sft", str(paths.config)],
        cwd=tmp_path,
        env=_tracked_env(mlflow_server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert events(run, "end")[-1]["status"] == "pruned"

    reader = EventAccumulator(str(_experiment_dir(plan) / "tensorboard" / tracked_run_name(run)))
    reader.Reload()
    assert [(e.step, e.value) for e in reader.Scalars("qlaunch/pruned_rung")] == [(1, 0.0)]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(plan.experiment.name)  # shared with the grid above: same name
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`qlaunch.run_id` = '{run.run_id}'")
    assert found.data.tags["qlaunch.state"] == "pruned"
    assert found.data.tags["qlaunch.pruned"].startswith("pruned @ rung 0 (eval_loss ")
    (folder,) = (_experiment_dir(plan) / "wandb").glob("offline-run-*")
    summary = {
        item.key: json.loads(item.value_json)
        for record in wandb_records(next(folder.glob("run-*.wandb")))
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    assert summary.get("qlaunch/state") == "pruned" and summary.get("qlaunch/pruned_rung") == 0
