"""Hub repos pinned and fetched once per grid, then read offline: the real huggingface_hub client
against a local hub (tests/fake_hub) through `HF_ENDPOINT`, the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.grid import plan
from launcher.job.hub import pinned_run, pins_path, read_pins
from launcher.job.progress import read_events
from launcher.job.storage import RunPaths, write_run_config
from tests.fake_hub import FakeHub

REPO = Path(__file__).resolve().parents[1]
MODEL = "qlaunch-test/tiny-llama"
DATA = "qlaunch-test/counting"
TOKEN = "hf_fakeSecretToken1234567890"
ROWS = [{"instruction": f"What comes after {n}?", "response": f"{n + 1} comes after {n}."} for n in range(24)]


def rows_file(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def publish_fake_model(hub: FakeHub, **kwargs) -> str:
    """A model repo the way Llama-2 repos look: configs, tokenizer, and two weight formats."""
    return hub.commit(
        "model",
        MODEL,
        {
            "config.json": b'{"model_type": "llama"}',
            "tokenizer.json": b'{"version": "1.0"}',
            "README.md": b"# tiny\n",
            "model.safetensors": os.urandom(40_000),  # large: served through the CDN redirect
            "pytorch_model.bin": os.urandom(40_000),  # the other format: never downloaded
        },
        **kwargs,
    )


def publish_data(hub: FakeHub, rows=ROWS) -> str:
    return hub.commit("dataset", DATA, {"data/train.jsonl": rows_file(rows), "README.md": b"# counting\n"})


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


def write_experiment(folder: Path, **sections) -> Path:
    data = {
        "name": "hubgrid",
        "model": {"name_or_path": MODEL, **sections.pop("model", {})},
        "dataset": {"path": DATA},
        "lora": {"r": 4, "alpha": 8},
        "resources": {"gpus_per_node": 0, "cpus_per_task": 1, "memory": "2G", "time_limit": "00:20:00"},
        "storage": {"root": str(folder / "runs")},
        "grid": {"lora.r": [4, 8, 16]},
        **sections,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hubgrid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def qlaunch(hub_endpoint: str, folder: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_ENDPOINT": hub_endpoint,
            "HF_HOME": str(folder / "user-hf-home"),  # no stored login of this machine's user
            "QLAUNCH_HOME": str(folder / "qlaunch-home"),
            "OMP_NUM_THREADS": "1",
            **({"HF_TOKEN": token} if token else {}),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, cwd=folder, timeout=900
    )


def test_one_download_for_a_grid_pinned_for_every_run(hub, tmp_path):
    model_sha, data_sha = publish_fake_model(hub), publish_data(hub)
    experiment = write_experiment(tmp_path)
    ids = [run.run_id for run in plan(experiment).runs]

    result = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment))
    assert result.returncode == 0, result.stderr
    assert "2 hub repos pinned for 3 runs" in result.stdout

    downloads = hub.downloads()
    assert len(downloads) == len(set(downloads)) == 6, downloads  # each file once for the 3 runs
    assert not any("pytorch_model.bin" in path for _, path in hub.requests)
    assert hub.count("GET", f"^/api/models/{MODEL}/revision/main$") == 1
    assert hub.count("GET", f"^/api/datasets/{DATA}/revision/main$") == 1

    pins = read_pins(pins_path(tmp_path / "runs", "hubgrid"))
    assert {(p["repo_id"], p["revision"]) for p in pins.values()} == {(MODEL, model_sha), (DATA, data_sha)}
    cache = tmp_path / "runs" / ".cache" / "huggingface" / "hub"
    snapshot = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / model_sha
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # Pinning is execution detail of the same runs: the ids the file always had.
    pinned = [pinned_run(run, pins) for run in plan(experiment).runs]
    assert [run.run_id for run in pinned] == ids
    assert {(run.model.revision, run.dataset.revision) for run in pinned} == {(model_sha, data_sha)}

    before = len(hub.requests)
    again = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment))
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stdout
    assert len(hub.requests) == before  # pinned and complete: no network at all


def test_a_dropped_connection_resumes_the_download_where_it_stopped(hub, tmp_path):
    weights = os.urandom(24 << 20)  # > the client's 10 MiB write chunk, so a part is kept
    model_sha = hub.commit("model", MODEL, {"config.json": b"{}", "model.safetensors": weights})
    publish_data(hub)
    experiment = write_experiment(tmp_path)
    hub.cut_after = 12 << 20

    result = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment))
    assert result.returncode == 0, result.stderr
    assert len(hub.ranges) == 1 and int(hub.ranges[0].split("=")[1].rstrip("-")) > 0  # continued, not restarted
    cache = tmp_path / "runs" / ".cache" / "huggingface" / "hub"
    snapshot = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / model_sha
    assert (snapshot / "model.safetensors").read_bytes() == weights


def test_pinned_grid_unaffected_when_the_hubs_main_moves(hub, tmp_path):
    old_model, old_data = publish_fake_model(hub), publish_data(hub)
    experiment = write_experiment(tmp_path)
    assert qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment)).returncode == 0
    record = pins_path(tmp_path / "runs", "hubgrid")
    recorded = record.read_bytes()

    new_model = publish_fake_model(hub)  # main moves on for the model only
    assert new_model != old_model
    downloads = len(hub.downloads())
    result = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment))
    assert result.returncode == 0, result.stderr
    assert len(hub.downloads()) == downloads
    assert record.read_bytes() == recorded
    runs = [pinned_run(run, read_pins(record)) for run in plan(experiment).runs]
    assert {run.model.revision for run in runs} == {old_model}

    status = qlaunch(hub.endpoint, tmp_path, "status", str(experiment), "--check-hub")
    assert status.returncode == 0, status.stderr
    out = " ".join(status.stdout.split())
    assert f"model {MODEL}@main has moved on: pinned {old_model[:12]}, the hub now has {new_model[:12]}" in out
    assert f"dataset {DATA}@main: pinned {old_data[:12]}, still the hub's" in out
    assert record.read_bytes() == recorded  # status changes nothing

    plain = qlaunch(hub.endpoint, tmp_path, "status", str(experiment))
    assert plain.returncode == 0 and "moved on" not in plain.stdout


def test_a_revision_in_the_experiment_file_is_what_is_pinned(hub, tmp_path):
    first = publish_fake_model(hub)
    publish_fake_model(hub)
    publish_data(hub)
    experiment = write_experiment(tmp_path, model={"revision": first})
    unpinned_ids = [run.run_id for run in plan(write_experiment(tmp_path / "other")).runs]
    assert qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment)).returncode == 0
    runs = plan(experiment).runs
    assert not set(unpinned_ids) & {run.run_id for run in runs}  # a written revision is another run
    pins = read_pins(pins_path(tmp_path / "runs", "hubgrid"))
    assert pins[f"model:{MODEL}@{first}"]["revision"] == first


def test_gated_repo_without_token_fails_before_anything_is_submitted(hub, tmp_path):
    publish_fake_model(hub, gated_token=TOKEN)
    publish_data(hub)
    experiment = write_experiment(tmp_path)

    result = qlaunch(hub.endpoint, tmp_path, "run", str(experiment), "--no-infer")
    assert result.returncode == 2
    error = " ".join(result.stderr.split())
    assert f"model.name_or_path: {MODEL} is gated: the hub refused it without a token (HTTP 401)" in error
    assert "$HF_TOKEN (model.hf_token_env)" in error and "Nothing submitted" in error
    assert "Traceback" not in result.stderr
    experiment_dir = tmp_path / "runs" / "hubgrid"
    assert not experiment_dir.exists() or not [p for p in experiment_dir.iterdir() if p.is_dir()]

    wrong = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment), token="hf_wrong")
    assert wrong.returncode == 2 and "refused the token from $HF_TOKEN" in " ".join(wrong.stderr.split())

    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    experiment = write_experiment(tmp_path, model={"hf_token_file": "token.txt"})
    ok = qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment))
    assert ok.returncode == 0, ok.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".log")]
    for text in [ok.stdout, ok.stderr, *(p.read_text(errors="replace") for p in written)]:
        assert TOKEN not in text


def test_missing_cached_file_is_one_clear_error_at_job_start(hub, tmp_path):
    model_sha = publish_fake_model(hub)
    publish_data(hub)
    experiment = write_experiment(tmp_path)
    assert qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment)).returncode == 0
    cache = tmp_path / "runs" / ".cache" / "huggingface" / "hub"
    (cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / model_sha / "model.safetensors").unlink()
    hub.stop()  # the node has no internet

    run = pinned_run(plan(experiment).runs[0], read_pins(pins_path(tmp_path / "runs", "hubgrid")))
    write_run_config(run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    job = subprocess.run(
        [sys.executable, "-m", "training.sft", str(RunPaths.of(run).config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert job.returncode == 2, job.stderr
    error = " ".join(job.stderr.split())
    assert (
        f"error: model.name_or_path: {MODEL} at revision {model_sha}: file 'model.safetensors' is not in "
        f"the hub cache {cache}"
    ) in error
    assert "qlaunch prefetch" in error and "Traceback" not in job.stderr
    (event,) = [e for e in read_events(RunPaths.of(run).progress) if e["event"] == "error"]
    assert "model.safetensors" in event["message"]

    resubmit = qlaunch("http://127.0.0.1:9", tmp_path, "run", str(experiment), "--no-infer")
    assert resubmit.returncode == 2
    assert "cannot reach the hub" in resubmit.stderr and "Nothing submitted" in " ".join(resubmit.stderr.split())


@pytest.mark.slow
def test_network_cut_job_trains_offline_on_the_pinned_revision(hub, tmp_path, tiny_model_dir):
    """Prefetch a gated tiny Llama + dataset with the token, let main move on, cut the network
    (server stopped, endpoint dead): `qlaunch run` trains and infers offline on the pinned commits."""
    model_sha = hub.commit_folder("model", MODEL, tiny_model_dir, gated_token=TOKEN)
    data_sha = publish_data(hub)
    experiment = write_experiment(
        tmp_path,
        grid={},
        train={
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 2,
            "max_seq_length": 64,
            "gradient_checkpointing": False,
        },
        inference={"prompts": ["What comes after 3?"], "max_new_tokens": 4},
    )
    (run,) = plan(experiment).runs
    assert qlaunch(hub.endpoint, tmp_path, "prefetch", str(experiment), token=TOKEN).returncode == 0
    publish_data(hub, ROWS[:2])  # main moves on after the pin
    hub.stop()

    result = qlaunch("http://127.0.0.1:9", tmp_path, "run", str(experiment), token=TOKEN)
    paths = RunPaths.of(run)
    log = paths.train_log.read_text() if paths.train_log.exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert paths.training_completed() and paths.inference_completed()
    written = yaml.safe_load(paths.config.read_text())
    assert written["run_id"] == run.run_id
    assert written["model"]["revision"] == model_sha and written["dataset"]["revision"] == data_sha
    assert {pin["revision"] for pin in written["hub_pins"]} == {model_sha, data_sha}
    assert f"read offline from {tmp_path / 'runs' / '.cache' / 'huggingface' / 'hub'}" in log
    for text in [result.stdout, result.stderr, log, paths.config.read_text(), paths.infer_log.read_text()]:
        assert TOKEN not in text


def test_slurm_script_of_a_prefetched_run_runs_offline_from_the_shared_cache(tmp_path):
    from launcher.backends.slurm.script import render_run

    experiment = write_experiment(tmp_path, backend="slurm", grid={})
    (run,) = plan(experiment).runs
    pins = {
        f"model:{MODEL}@main": {"revision": "a" * 40, "files": ["config.json"]},
        f"dataset:{DATA}@main": {"revision": "b" * 40, "files": ["data/train.jsonl"]},
    }
    script = render_run(pinned_run(run, pins)).train
    assert f"export HF_HOME={tmp_path / 'runs' / '.cache' / 'huggingface'}\n" in script
    assert "export HF_HUB_OFFLINE=1\n" in script and "export HF_DATASETS_OFFLINE=1\n" in script
    assert "HF_HUB_OFFLINE" not in render_run(run).train  # --no-prefetch: the job reaches the hub


def test_only_the_weights_a_job_loads_are_downloaded(tmp_path):
    from launcher.job.hub import hub_refs
    from launcher.prefetch import PrefetchError, select_files

    siblings = [
        (name, 1)
        for name in (
            "config.json",
            "tokenizer.model",
            "model-00001.safetensors",
            "pytorch_model-00001.bin",
            "original/consolidated.00.pth",
            "tiny.Q4_0.gguf",
            "tiny.Q8_0.gguf",
        )
    ]

    def files(**model):
        (run,) = plan(write_experiment(tmp_path, grid={}, model=model)).runs
        return select_files(hub_refs(run)[0], run, siblings)

    assert files() == ["config.json", "model-00001.safetensors", "tokenizer.model"]
    assert files(gguf_file="tiny.Q8_0.gguf") == ["config.json", "tiny.Q8_0.gguf", "tokenizer.model"]
    assert files(init="random") == ["config.json", "tokenizer.model"]
    with pytest.raises(
        PrefetchError, match=r"model.gguf_file: no 'tiny.Q2_K.gguf' in .*tiny.Q4_0.gguf, tiny.Q8_0.gguf"
    ):
        files(gguf_file="tiny.Q2_K.gguf")
