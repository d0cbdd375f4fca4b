"""`qlaunch export --backend kubernetes`: the export as one Job (issue #32), against the fake API server.

The Job a user reviews (`--dry-run` prints it) is snapshot-tested and checked against the official
schemas of two Kubernetes versions; the rest talks to tests/fake_kube with the real client: the
Job is created once (server-side dry run first), every refusal comes before anything is created,
and in the end-to-end test the test plays the kubelet: it runs the Job's container command here,
the claim a folder at storage.root and the run's ConfigMap a folder, on a trained tiny run, and the
export it writes is the one a local export writes; `status --json` shows it from the pod's log.
Snapshots: tests/snapshots/k8s/export/ (QLAUNCH_UPDATE_SNAPSHOTS=1 to rewrite, then review).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fake_kube import start_cluster
from snapshot_support import assert_matches_snapshot
from training_support import job_env, mount_config_map, run_job, tail

from launcher.backends.kubernetes import export as export_manifest
from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.naming import Names
from launcher.backends.kubernetes.staging import CONFIG_MOUNT
from launcher.cli import main
from launcher.grid import plan
from launcher.job.storage import RunPaths
from launcher.jobspec import export_finish_command, export_job

NS = "ml-team"
SNAPSHOTS = Path(__file__).parent / "snapshots" / "k8s" / "export"
SCHEMA_VERSIONS = ("1.30", "1.37")  # as tests/test_k8s_render.py
TOKEN = "hf_k8sExportSecret0123456789abcd"
LLAMA_7B = "NousResearch/Llama-2-7b-chat-hf"

CASES = {
    # A 7B merge + GGUF pushed to the hub, on a cluster whose GPU pool is tainted, spot nodes too.
    "merge-push": (
        """\
        name: llama2-guanaco
        backend: kubernetes
        model: {name_or_path: NousResearch/Llama-2-7b-chat-hf}
        storage: {root: /mnt/qlaunch}
        resources: {gpus_per_node: 1, cpus_per_task: 8, memory: 64G}
        kubernetes:
          namespace: ml-team
          hf_token_secret: {name: hf-token}
          node_selector: {pool: general}
          tolerations:
            - {key: nvidia.com/gpu, operator: Exists}
            - {key: cloud.google.com/gke-spot, operator: Equal, value: "true", effect: NoSchedule}
        """,
        dict(merge=True, gguf_type="q8_0", repo="team/guanaco-7b", memory=None),
    ),
    # The adapter alone, under Kueue, into a folder with a space and a quote (every word quoted).
    "adapter-kueue": (
        """\
        name: llama2-kueue
        backend: kubernetes
        model: {name_or_path: NousResearch/Llama-2-7b-chat-hf}
        storage: {root: "/mnt/q runs"}
        kubernetes: {namespace: research, queue_name: t4-queue}
        """,
        dict(merge=False, gguf_type=None, repo=None, memory=None, out="/mnt/q runs/it's $(here)"),
    ),
}


def _case(tmp_path: Path, case: str, **options):
    text, defaults = CASES[case]
    options = {**defaults, **options}
    path = tmp_path / f"{case}.yaml"
    path.write_text(textwrap.dedent(text))
    p = plan(path)
    run = p.runs[0]
    out = options.get("out") or str(Path(run.run_dir) / "export")
    job = export_job(run, out, options["merge"], options["gguf_type"], options["memory"])
    finish = export_finish_command(job, options["repo"], True)
    return p, run, job, finish, export_manifest.export_document(p, run, job, finish, options["repo"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_export_job_matches_its_snapshot_and_both_kubernetes_versions_schemas(tmp_path, case):
    p, run, _, _, document = _case(tmp_path, case)
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)
    text = export_manifest.file_text(p, run, document)
    assert_matches_snapshot(text, SNAPSHOTS / f"{case}.yaml")


def test_a_merge_is_a_cpu_pod_with_the_memory_the_merge_needs_and_the_token_only_by_reference(tmp_path):
    _, run, _, _, job = _case(tmp_path, "merge-push")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # 6.7e9 parameters x 7.2 bytes (float16 merge checked in float32): 45.x GiB, as Slurm's --mem=46G.
    assert container["resources"] == {"limits": {"memory": "46Gi"}, "requests": {"cpu": "4", "memory": "46Gi"}}
    # No GPU: no GPU node label, no toleration of the GPU taint; the user's selector and spot toleration stay.
    assert pod["nodeSelector"] == {"pool": "general"}
    assert [t["key"] for t in pod["tolerations"]] == ["cloud.google.com/gke-spot"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"key": "token", "name": "hf-token"}}} in container["env"]
    assert TOKEN not in json.dumps(job) and "hf_" not in json.dumps(container["command"])
    assert {v["name"]: v for v in pod["volumes"]}["storage"] == {
        "name": "storage",
        "persistentVolumeClaim": {"claimName": "qlaunch-storage"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and job["spec"]["ttlSecondsAfterFinished"] == 604800
    assert job["spec"]["backoffLimit"] == 3 and "suspend" not in job["spec"]
    # --memory replaces the estimate.
    _, _, _, _, asked = _case(tmp_path, "merge-push", memory="64G")
    assert asked["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "64Gi"


def test_the_container_runs_the_slurm_scripts_steps_with_every_word_quoted(tmp_path):
    _, run, job, finish, document = _case(tmp_path, "adapter-kueue")
    shell, flag, script = document["spec"]["template"]["spec"]["containers"][0]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    export_step, finish_step = (shlex.split(part) for part in script.split(" && "))
    out = "/mnt/q runs/it's $(here)"
    assert export_step == ["python", "-m", "training.export", f"{CONFIG_MOUNT}/run.yaml", "--out", out]
    assert finish_step == [
        "exec",
        "python",
        "-m",
        "launcher.export_command",
        "--finish",
        "/config/run.yaml",
        "--out",
        out,
    ]
    # Under Kueue the Job waits for the queue like a training Job; no GPU was asked for anyway.
    assert document["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    assert document["spec"]["suspend"] is True
    assert document["spec"]["activeDeadlineSeconds"] == 30 * 60  # an adapter export: half an hour


def test_an_output_folder_off_the_claim_is_refused(tmp_path):
    from launcher.job.errors import ConfigError

    with pytest.raises(ConfigError, match="the export Job writes into the storage claim, mounted at /mnt/q runs"):
        _case(tmp_path, "adapter-kueue", out="/home/me/exports")


# ---- against the fake API server ---------------------------------------------------------------


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, NS, hf_token=TOKEN)
    yield server
    server.stop()


def _submitted(tmp_path: Path, secret: bool = True, **sections):
    """A submitted one-run Kubernetes experiment (its training Job and ConfigMap exist)."""
    data = {
        "name": "exp",
        "backend": "kubernetes",
        "model": {"name_or_path": LLAMA_7B},
        "storage": {"root": "/mnt/qlaunch"},
        "inference": {"enabled": False},
        "kubernetes": {"namespace": NS, **({"hf_token_secret": {"name": "hf-token"}} if secret else {})},
        **sections,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    p = plan(path)
    KubernetesBackend(poll_seconds=0.02).submit(p)
    return path, p, p.runs[0]


def _export_jobs(fake) -> list[dict]:
    return [j for j in fake.list("jobs", NS) if j["metadata"]["labels"].get("qlaunch.dev/role") == "export"]


def _writes(fake) -> list[dict]:
    """Requests that changed something (not dry runs, not reads)."""
    return [r for r in fake.requests if r["method"] != "GET" and "dryRun" not in r["query"]]


def _qlaunch(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def test_dry_run_prints_the_job_checked_by_the_api_server_and_creates_nothing(fake, tmp_path, capsys):
    path, p, run = _submitted(tmp_path)
    fake.complete_job(NS, Names.of("exp", run.run_id).train_job)
    before = len(_writes(fake))
    code, out, err = _qlaunch(capsys, "export", str(path), "--run", run.run_id, "--merge", "--dry-run")
    assert code == 0, err
    (document,) = [d for d in yaml.safe_load_all(out) if d]
    assert document["kind"] == "Job" and document["metadata"]["labels"]["qlaunch.dev/role"] == "export"
    assert "validated by the API server (server-side dry run)" in err and "was not submitted" in err
    name = document["metadata"]["name"]
    assert any(r["path"].endswith(f"/jobs/{name}") and "dryRun" in r["query"] for r in fake.requests)
    assert _export_jobs(fake) == [] and len(_writes(fake)) == before


def test_the_job_is_created_once_with_hints_that_reach_the_same_cluster(fake, tmp_path, capsys):
    path, p, run = _submitted(tmp_path)
    fake.complete_job(NS, Names.of("exp", run.run_id).train_job)
    kubeconfig = str(tmp_path / "kubeconfig")
    args = ("export", str(path), "--run", run.run_id, "--kubeconfig", kubeconfig, "--context", "fake")
    code, out, err = _qlaunch(capsys, *args)
    assert code == 0, err
    (job,) = _export_jobs(fake)
    name = job["metadata"]["name"]
    assert f"export job {name} of run {run.run_id} (adapter) submitted to kubernetes" in out
    assert (
        f"qlaunch logs {run.run_id} -e {path} --kubeconfig {kubeconfig} --context fake --export -f" in out
        and f"qlaunch status {path} --kubeconfig {kubeconfig} --context fake" in out
    )
    # Again while it runs: one error, the same Job.
    fake.run_pod(NS, fake.start_pod(NS, name))
    code, out, err = _qlaunch(capsys, *args)
    assert code != 0 and err.count("error:") == 1 and "still queued or running" in err
    assert [j["metadata"]["uid"] for j in _export_jobs(fake)] == [job["metadata"]["uid"]]
    # Once it has ended, the same folder's export replaces it; another folder gets its own Job.
    fake.finish_pod(NS, fake.pods_of(NS, name)[0]["metadata"]["name"])
    fake.complete_job(NS, name)
    assert _qlaunch(capsys, *args)[0] == 0
    (again,) = _export_jobs(fake)
    assert again["metadata"]["name"] == name and again["metadata"]["uid"] != job["metadata"]["uid"]
    assert _qlaunch(capsys, *args, "-o", "/mnt/qlaunch/elsewhere")[0] == 0
    assert len(_export_jobs(fake)) == 2


@pytest.mark.parametrize("case", ["unknown run", "unfinished run", "push without a token Secret", "bare repo name"])
def test_refusals_are_one_error_and_create_nothing(fake, tmp_path, capsys, case):
    path, p, run = _submitted(tmp_path, secret=case != "push without a token Secret")
    train = Names.of("exp", run.run_id).train_job
    if case != "unfinished run":
        fake.complete_job(NS, train)
    else:
        fake.run_pod(NS, fake.start_pod(NS, train))
    before = len(_writes(fake))
    args = {
        "unknown run": ["--run", "ffffffffff"],
        "unfinished run": ["--run", run.run_id],
        "push without a token Secret": ["--run", run.run_id, "--push-to-hub", "alice/x"],
        "bare repo name": ["--run", run.run_id, "--push-to-hub", "x"],
    }[case]
    code, out, err = _qlaunch(capsys, "export", str(path), *args)
    assert code != 0 and err.count("error:") == 1, err
    expected = {
        "unknown run": "ffffffffff",
        "unfinished run": f"run {run.run_id} has not finished training (state: running)",
        "push without a token Secret": "gets a hub token only from the Secret that kubernetes.hf_token_secret names",
        "bare repo name": "name the repo with its owner (user/x or org/x)",
    }[case]
    assert expected in err
    assert _export_jobs(fake) == [] and len(_writes(fake)) == before


# ---- end to end: the test plays the kubelet ----------------------------------------------------


@pytest.fixture
def trained_on_the_claim(tmp_path, tiny_plan, fake):
    """A trained tiny run of a Kubernetes experiment whose storage.root is a folder here (the
    claim), submitted to the fake server, its training Job completed."""
    claim = tmp_path / "claim"
    p = tiny_plan(
        tmp_path / "exp",
        backend="kubernetes",
        storage={"root": str(claim)},
        inference={"enabled": False},
        kubernetes={"namespace": NS, "hf_token_secret": {"name": "hf-token"}},
    )
    run = p.runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    KubernetesBackend(poll_seconds=0.02).submit(p)
    fake.complete_job(NS, Names.of(p.experiment.name, run.run_id).train_job)
    return p, run


def _play_kubelet(fake, tmp_path: Path, job: dict, hub: dict[str, str] | None = None) -> tuple[int, str]:
    """The Job's pod, run here: the run's ConfigMaps as a folder, the claim at storage.root
    (already so), the image's `python` this interpreter; the container's command as it is. Its
    output becomes the pod's log on the fake server; returns its exit code and output. `hub`: the hub's
    variables (HF_ENDPOINT, and HF_TOKEN as the kubelet resolves it from the Secret)."""
    config = mount_config_map(fake.list("configmaps", NS), tmp_path / "config", CONFIG_MOUNT)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    shell, flag, script = container["command"]
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = job_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    env.update(hub or {"HF_HUB_OFFLINE": "1"})
    pod = subprocess.run(
        [shell, flag, script.replace(f"{CONFIG_MOUNT}/", f"{config}/")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pod.returncode == 0 or hub, pod.stdout[-3000:] + pod.stderr[-3000:]
    name = job["metadata"]["name"]
    pod_name = fake.start_pod(NS, name)
    fake.run_pod(NS, pod_name)
    fake.log(NS, pod_name, *pod.stdout.splitlines(), *pod.stderr.splitlines())
    fake.finish_pod(NS, pod_name, exit_code=pod.returncode)
    if pod.returncode == 0:
        fake.complete_job(NS, name)
    else:
        fake.fail_job(NS, name, reason="PodFailurePolicy")
    return pod.returncode, pod.stdout + pod.stderr


@pytest.mark.slow
def test_the_export_jobs_command_writes_what_a_local_export_writes_and_status_shows_it(
    fake, tmp_path, capsys, trained_on_the_claim
):
    p, run = trained_on_the_claim
    path = str(p.source)
    here = tmp_path / "claim" / "here"
    code, out, err = _qlaunch(capsys, "export", path, "--run", run.run_id, "--backend", "local", "-o", str(here))
    assert code == 0, out[-2000:] + err[-2000:]
    code, out, err = _qlaunch(capsys, "export", path, "--run", run.run_id)
    assert code == 0, err
    (job,) = _export_jobs(fake)
    _play_kubelet(fake, tmp_path, job)

    there = RunPaths.of(run).root / "export"
    assert sorted(f.name for f in there.iterdir()) == sorted(f.name for f in here.iterdir())
    for file in here.iterdir():
        if file.name not in ("README.md", "export.json"):  # these name their own folder and time
            assert (there / file.name).read_bytes() == file.read_bytes(), file.name
    record, local_record = (json.loads((d / "export.json").read_text()) for d in (there, here))
    assert record["kind"] == local_record["kind"] == "adapter" and record["files"] == local_record["files"]

    # The laptop cannot read the claim: status --json shows the export from the pod's log.
    (RunPaths.of(run).root / "exports.json").unlink()
    code, out, err = _qlaunch(capsys, "status", path, "--json")
    assert code == 0, err
    (shown,) = json.loads(out)["runs"][0]["exports"]
    assert shown["path"] == str(there) and shown["kind"] == "adapter"
    code, out, err = _qlaunch(capsys, "logs", run.run_id, "--export", "-e", path)
    assert code == 0 and f"export of run {run.run_id}: {there}" in out, err


@pytest.mark.slow
def test_a_merge_job_ships_the_same_checked_merge_as_a_local_merge(fake, tmp_path, capsys, trained_on_the_claim):
    p, run = trained_on_the_claim
    path = str(p.source)
    here, there = tmp_path / "claim" / "merged-here", tmp_path / "claim" / "merged-there"
    local = _qlaunch(capsys, "export", path, "--run", run.run_id, "--merge", "--backend", "local", "-o", str(here))
    assert local[0] == 0, local[1][-2000:] + local[2][-2000:]
    code, out, err = _qlaunch(
        capsys, "export", path, "--run", run.run_id, "--merge", "--memory", "4G", "-o", str(there)
    )
    assert code == 0, err
    (job,) = _export_jobs(fake)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "4Gi"
    _play_kubelet(fake, tmp_path, job)
    assert sorted(f.name for f in there.iterdir()) == sorted(f.name for f in here.iterdir())
    assert (there / "model.safetensors").read_bytes() == (here / "model.safetensors").read_bytes()
    record, local_record = (json.loads((d / "export.json").read_text()) for d in (there, here))
    assert record["merge_check"]["chosen"] == local_record["merge_check"]["chosen"]
    assert record["merge_check"]["candidates"] == local_record["merge_check"]["candidates"]


@pytest.mark.slow
def test_the_pod_asks_the_hub_with_the_secrets_token_before_exporting_and_pushes_it_written_nowhere(
    fake, tmp_path, capsys, trained_on_the_claim
):
    from tests.fake_hub import FakeHub

    p, run = trained_on_the_claim
    path = str(p.source)
    hub = FakeHub().start()
    try:
        hub.add_user(TOKEN, "alice")
        hub.add_user("hf_readOnly0123456789abcdefgh", "bob", role="read")
        refused_out = tmp_path / "claim" / "refused"
        code, out, err = _qlaunch(
            capsys, "export", path, "--run", run.run_id, "--push-to-hub", "bob/x", "-o", str(refused_out)
        )
        assert code == 0, err  # the token is the Secret's: only the pod can ask the hub
        (job,) = _export_jobs(fake)
        # A read-only token in the Secret: the pod stops before exporting anything.
        read_only = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_readOnly0123456789abcdefgh"}
        assert _play_kubelet(fake, tmp_path, job, hub=read_only)[0] == 1
        assert not refused_out.exists() and ("model", "bob/x") not in hub.repos
        code, out, err = _qlaunch(capsys, "logs", run.run_id, "--export", "-e", path)
        assert "cannot write to bob/" in out and "hf_readOnly" not in out

        pushed_out = tmp_path / "claim" / "pushed"
        code, out, err = _qlaunch(
            capsys, "export", path, "--run", run.run_id, "--push-to-hub", "alice/tiny", "-o", str(pushed_out)
        )
        assert code == 0, err
        job = next(j for j in _export_jobs(fake) if j["metadata"]["name"] != job["metadata"]["name"])
        code, log = _play_kubelet(fake, tmp_path, job, hub={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN})
        assert code == 0, log[-3000:]
        assert "pushed to " in log and TOKEN not in log  # what its pod printed
        repo = hub.repos[("model", "alice/tiny")]
        record = json.loads((pushed_out / "export.json").read_text())
        assert repo.private and record["hub"]["revision"] == repo.refs["main"]
        assert (
            hub.files("model", "alice/tiny")["adapter_model.safetensors"]
            == (pushed_out / "adapter_model.safetensors").read_bytes()
        )
        written = b"".join(f.read_bytes() for f in (tmp_path / "claim").rglob("*") if f.is_file())
        manifests = json.dumps(fake.list("jobs", NS))
        assert TOKEN.encode() not in written and TOKEN not in manifests
    finally:
        hub.stop()
