"""`qlaunch export --backend slurm`: the export as a job on the experiment's cluster (issue #32).

The script a user reviews (`--dry-run` prints it) is snapshot-tested without a cluster; the rest
runs on the real test cluster (slurm/cluster.sh up): a trained tiny run exported by a Slurm job
gives the same files as an export on this machine, and every refusal comes before sbatch.
Snapshots: tests/snapshots/slurm/export/ (QLAUNCH_UPDATE_SNAPSHOTS=1 to rewrite, then review).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_support import REPO, require_cluster, scheduler_jobs, unique_name, wait_for
from snapshot_support import assert_matches_snapshot
from training_support import run_job, tail

from launcher.backends.slurm.script import render_export
from launcher.export_command import export_finish_command
from launcher.grid import plan
from launcher.job.storage import RunPaths, write_json
from launcher.jobspec import export_job
from tests.fake_hub import FakeHub

SNAPSHOTS = Path(__file__).parent / "snapshots" / "slurm" / "export"
TOKEN = "hf_exportJobSecret0123456789abcd"
LLAMA_7B = "NousResearch/Llama-2-7b-chat-hf"

CASES = {
    # A 7B merge + GGUF pushed to the hub from a GPU cluster: token file, site directives, a venv.
    "merge-push": (
        {
            "name": "llama2-guanaco",
            "model": {"name_or_path": LLAMA_7B, "hf_token_file": "/home/me/.cache/hf_token"},
            "storage": {"root": "/shared/qlaunch-runs"},
            "environment": {
                "setup": ["module load cuda/12.1", "source /shared/envs/qlora/bin/activate"],
                "variables": {"HF_HOME": "/shared/hf cache", "WANDB_MODE": "offline"},
            },
            "slurm": {
                "partition": "gpu",
                "inference_partition": "gpu-short",
                "account": "ml-team",
                "extra_directives": ["--comment=qlaunch grid #1"],
            },
        },
        dict(merge=True, gguf_type="q8_0", repo="team/guanaco-7b", private=True),
    ),
    # The adapter alone, in the job image under Docker: 1 CPU, 2G, no GPU, half an hour.
    "adapter-docker": (
        {
            "name": "llama2-docker",
            "model": {"name_or_path": LLAMA_7B},
            "storage": {"root": "/shared/qlaunch-runs"},
            "environment": {"container": "registry.example.com/ml/qlaunch-train:0.1.0", "container_runtime": "docker"},
        },
        dict(merge=False, gguf_type=None, repo=None, private=True),
    ),
}


def _rendered(tmp_path: Path, case: str) -> str:
    data, options = CASES[case]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    run = plan(path).runs[0]
    out = str(Path(run.run_dir) / "export")
    job = export_job(run, out, options["merge"], options["gguf_type"])
    text, _ = render_export(run, job, export_finish_command(job, options["repo"], options["private"]))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    return text.replace(str(tmp_path), "<experiment dir>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_export_script_matches_its_snapshot(tmp_path, case):
    text = _rendered(tmp_path, case)
    assert_matches_snapshot(text, SNAPSHOTS / f"{case}.sbatch")


def test_the_merge_job_asks_for_the_memory_the_merge_needs_and_the_adapter_job_for_little(tmp_path):
    merge = _rendered(tmp_path, "merge-push")
    # 6.7e9 parameters x 7.2 bytes (float16 merge checked in float32): 45.x GiB, rounded up.
    assert "#SBATCH --mem=46G" in merge and "#SBATCH --gres=gpu:" in merge and "#SBATCH --partition=gpu-short" in merge
    assert "--merge --gguf q8_0" in merge and "--push-to-hub team/guanaco-7b" in merge and "--public" not in merge
    # The token file is bound into nothing here (no container) and read by the job: its path, never a token.
    assert "HF_TOKEN=" not in merge and "hub token" not in merge
    adapter = _rendered(tmp_path, "adapter-docker")
    assert "#SBATCH --mem=2G" in adapter and "#SBATCH --cpus-per-task=1" in adapter and "--gres" not in adapter
    assert "#SBATCH --time=00:30:00" in adapter and "--merge" not in adapter and "push-to-hub" not in adapter
    assert "--volume /shared/qlaunch-runs:/shared/qlaunch-runs" in adapter


# ---- on the real cluster -----------------------------------------------------------------------


def qlaunch(
    folder: Path, *args: str, token: str | None = None, endpoint: str = "http://127.0.0.1:9", timeout: float = 600
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(folder / "hf-home"),
            "QLAUNCH_HOME": str(folder / "qlaunch-home"),
            "OMP_NUM_THREADS": "1",
            **({"HF_TOKEN": token} if token else {}),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def export_jobs(name: str) -> list[str]:
    """Every job of this experiment's exports slurmctld knows (by the job name prefix)."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i %j"], capture_output=True, text=True
    ).stdout
    return [
        line.split()[0]
        for line in out.splitlines()
        if line.split()[1:] and line.split()[1].startswith(name) and line.split()[1].endswith("-export")
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_plan):
    """A trained tiny run of a Slurm experiment (trained here: the export is what is tested)."""
    require_cluster()
    folder = tmp_path_factory.mktemp("export-job")
    p = tiny_plan(folder, name=unique_name("export"), backend="slurm", environment={"python": sys.executable})
    run = p.runs[0]
    started = time.monotonic()
    assert run_job("training.sft", RunPaths.of(run).config, log=folder / "train.log", cwd=folder) == 0, tail(
        folder / "train.log"
    )
    print(f"trained in {time.monotonic() - started:.1f} s")
    return p, run, folder


@pytest.mark.slurm
@pytest.mark.slow
def test_a_slurm_export_job_writes_what_a_local_export_writes(trained):
    p, run, folder = trained
    started = time.monotonic()
    local = qlaunch(
        folder, "export", str(p.source), "--run", run.run_id, "--backend", "local", "-o", str(folder / "here")
    )
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    done = qlaunch(folder, "export", str(p.source), "--run", run.run_id)  # the experiment's backend: slurm
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job = re.search(r"export job (\d+) of run", done.stdout).group(1)
    assert f"qlaunch logs {run.run_id} -e {p.source} --export -f" in done.stdout  # slurm: the file's own backend
    out = RunPaths.of(run).root / "export"
    wait_for(lambda: scheduler_jobs(job).get(job) == "COMPLETED", timeout=300, message="the export job", interval=2)
    print(f"local export + slurm export job in {time.monotonic() - started:.1f} s")
    here = folder / "here"
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in here.iterdir())
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (here / name).read_bytes(), name
    record, local_record = (json.loads((d / "export.json").read_text()) for d in (out, here))
    assert record["kind"] == local_record["kind"] == "adapter" and record["files"] == local_record["files"]
    # Recorded once the job ended, as a local export is: status --json shows both.
    status = json.loads(qlaunch(folder, "status", str(p.source), "--json").stdout)
    assert {e["path"] for e in status["runs"][0]["exports"]} == {str(out), str(here)}
    log = qlaunch(folder, "logs", run.run_id, "--export", "-e", str(p.source))
    assert log.returncode == 0 and f"job {job} " in log.stdout and f"export of run {run.run_id}: {out}" in log.stdout
    script = (RunPaths.of(run).root / "export.sbatch").read_text()
    assert "#SBATCH --mem=2G" in script and f"--output={RunPaths.of(run).root}/export.log" in script


@pytest.mark.slurm
@pytest.mark.slow
def test_a_slurm_merge_job_ships_the_same_checked_merge_as_a_local_one(trained, tmp_path):
    p, run, folder = trained
    started = time.monotonic()
    here, there = tmp_path / "merged-here", tmp_path / "merged-there"
    done = qlaunch(folder, "export", str(p.source), "--run", run.run_id, "--merge", "--memory", "4G", "-o", str(there))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job = re.search(r"export job (\d+) of run", done.stdout).group(1)
    local = qlaunch(
        folder, "export", str(p.source), "--run", run.run_id, "--merge", "--backend", "local", "-o", str(here)
    )
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    wait_for(
        lambda: scheduler_jobs(job).get(job) in ("COMPLETED", "FAILED"),
        timeout=600,
        message="the merge job",
        interval=3,
    )
    log = (RunPaths.of(run).root / "export.log").read_text()
    assert scheduler_jobs(job)[job] == "COMPLETED", log[-3000:]
    print(f"merge here and as a Slurm job (1 CPU, 4G) in {time.monotonic() - started:.1f} s")
    script = (RunPaths.of(run).root / "export.sbatch").read_text()
    assert "#SBATCH --mem=4G" in script and "--merge" in script
    assert sorted(f.name for f in there.iterdir()) == sorted(f.name for f in here.iterdir())
    assert (there / "model.safetensors").read_bytes() == (here / "model.safetensors").read_bytes()
    record, local_record = (json.loads((d / "export.json").read_text()) for d in (there, here))
    assert record["merge_check"]["chosen"] == local_record["merge_check"]["chosen"] == "dequantized-4bit"
    assert record["merge_check"]["candidates"] == local_record["merge_check"]["candidates"]


@pytest.mark.slurm
@pytest.mark.slow
def test_the_job_pushes_with_the_token_from_its_environment_and_writes_it_nowhere(trained, tmp_path):
    p, run, folder = trained
    hub = FakeHub().start()
    try:
        hub.add_user(TOKEN, "alice")
        dry = qlaunch(
            folder,
            "export",
            str(p.source),
            "--run",
            run.run_id,
            "--push-to-hub",
            "alice/tiny-adapter",
            "--dry-run",
            token=TOKEN,
            endpoint=hub.endpoint,
        )
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "--push-to-hub alice/tiny-adapter" in dry.stdout and TOKEN not in dry.stdout + dry.stderr
        assert ("model", "alice/tiny-adapter") not in hub.repos
        out = tmp_path / "pushed"
        done = qlaunch(
            folder,
            "export",
            str(p.source),
            "--run",
            run.run_id,
            "--push-to-hub",
            "alice/tiny-adapter",
            "-o",
            str(out),
            token=TOKEN,
            endpoint=hub.endpoint,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        job = re.search(r"export job (\d+) of run", done.stdout).group(1)
        wait_for(
            lambda: scheduler_jobs(job).get(job) in ("COMPLETED", "FAILED"),
            timeout=300,
            message="the export job",
            interval=2,
        )
        log = (RunPaths.of(run).root / "export.log").read_text()
        assert scheduler_jobs(job)[job] == "COMPLETED", log[-3000:]
        repo = hub.repos[("model", "alice/tiny-adapter")]
        record = json.loads((out / "export.json").read_text())
        assert repo.private and record["hub"]["revision"] == repo.refs["main"] and record["hub"]["private"] is True
        pushed = hub.files("model", "alice/tiny-adapter")
        assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
        assert "pushed to " in log and f"job {job} " in log
        written = b"".join(f.read_bytes() for root in (p.storage_root, out) for f in root.rglob("*") if f.is_file())
        assert TOKEN.encode() not in written and TOKEN not in done.stdout + done.stderr
    finally:
        hub.stop()


@pytest.mark.slurm
@pytest.mark.slow
def test_refused_exports_submit_nothing(trained, tmp_path, tiny_plan):
    p, run, folder = trained
    before = export_jobs(run.name)
    unfinished = tiny_plan(tmp_path / "unfinished", name=run.name, backend="slurm").runs[0]
    refused = qlaunch(tmp_path, "export", str(tmp_path / "unfinished" / f"{run.name}.yaml"), "--run", unfinished.run_id)
    assert refused.returncode == 2 and f"run {unfinished.run_id} has not finished training" in " ".join(
        refused.stderr.split()
    )
    no_token = qlaunch(folder, "export", str(p.source), "--run", run.run_id, "--push-to-hub", "alice/x")
    assert no_token.returncode == 2 and "no hub token ($HF_TOKEN is empty or unset)" in " ".join(
        no_token.stderr.split()
    )
    # A 7B merge (its adapter faked: nothing loads) needs ~45G: more than a node of this cluster has.
    big = tiny_plan(tmp_path / "big", name=run.name, backend="slurm", model={"name_or_path": LLAMA_7B}).runs[0]
    write_json(RunPaths.of(big).adapter / "adapter_config.json", {})
    write_json(RunPaths.of(big).metrics, {"global_step": 8})
    source = str(tmp_path / "big" / f"{run.name}.yaml")
    too_big = qlaunch(tmp_path, "export", source, "--run", big.run_id, "--merge")
    message = " ".join(too_big.stderr.split())
    assert too_big.returncode == 3 and too_big.stderr.count("error:") == 1  # 3: the scheduler refused
    assert f"the export job of run {big.run_id}: Slurm refuses it" in message
    assert "it asks for --mem=46G (what the merge needs, or --memory)" in message and "nothing was submitted" in message
    asked = qlaunch(tmp_path, "export", source, "--run", big.run_id, "--merge", "--memory", "16G")
    message = " ".join(asked.stderr.split())
    assert asked.returncode == 2 and f"--merge of run {big.run_id} needs about 45.2 GiB of host memory" in message
    assert "the export job would ask for 16G (--memory): ask for at least 46G, or leave --memory out" in message
    # --dry-run: the script, checked by slurmctld, nothing queued or written; no token in it.
    dry = qlaunch(folder, "export", str(p.source), "--run", run.run_id, "--dry-run", "-o", str(tmp_path / "dry"))
    assert (
        dry.returncode == 0
        and dry.stdout.startswith("#!/bin/bash\n")
        and "sbatch --test-only accepted it" in dry.stderr
    )
    assert export_jobs(run.name) == before and not (tmp_path / "dry").exists()
    assert not any(RunPaths.of(r).root.joinpath("export.sbatch").exists() for r in (unfinished, big))
