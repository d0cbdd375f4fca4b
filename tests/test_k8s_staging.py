"""Local data files reach the pods without a manual copy: small ones in the run's ConfigMap,
larger ones staged onto the claim through a short-lived pod and `pods/exec`, content-addressed.

The fake API server (tests/fake_kube) plays the kubelet: the staging pod runs, and the exec'd
upload script really runs here, writing into a folder that stands for the claim.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fake_kube import start_cluster
from fake_kube.exec_stream import V4, Kubelet

from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.manifests import run_documents
from launcher.backends.kubernetes.naming import Names
from launcher.backends.kubernetes.upload import stage_pod
from launcher.grid import plan
from launcher.job.errors import BackendError
from launcher.job.experiment_file import load_yaml

ROOT = Path(__file__).resolve().parents[1]
NS = "ml-team"
CLAIM = "qlaunch-storage"
EXPERIMENT = """\
    name: staged
    backend: kubernetes
    storage: {root: /mnt/qlaunch}
    kubernetes: {namespace: ml-team}
    dataset: {path: data/train.jsonl}
    inference:
      eval_file: data/eval.jsonl
    grid:
      lora.r: [16, 64]
"""


def write_dataset(path: Path, size: int = 5_000_000, tag: str = "") -> bytes:
    rows, total, i = [], 0, 0
    while total < size:
        line = json.dumps({"text": f"### Human: question {i}{tag}? ### Assistant: " + "answer " * 30}) + "\n"
        rows.append(line)
        total += len(line)
        i += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(rows).encode()
    path.write_bytes(data)
    return data


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, NS)
    kubelet = Kubelet(server, volumes={CLAIM: tmp_path / "claim"})
    (tmp_path / "claim").mkdir()
    yield server, kubelet, tmp_path / "claim"
    server.stop()


@pytest.fixture
def experiment(tmp_path):
    folder = tmp_path / "exp"
    data = write_dataset(folder / "data" / "train.jsonl")
    (folder / "data" / "eval.jsonl").write_text('{"prompt": "Capital of France?", "reference": "Paris"}\n')
    path = folder / "staged.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT))
    return path, data


def backend() -> KubernetesBackend:
    return KubernetesBackend(poll_seconds=0.02)


def uploads(kubelet: Kubelet) -> list[list[str]]:
    return [command for command in kubelet.execs if "qlaunch-stage" in command]


def pod_config(server, p, run) -> dict:
    return load_yaml(server.get("configmaps", NS, Names.of(p.experiment.name, run.run_id).config)["data"]["run.yaml"])


def data_config_map(server, p, key: str) -> dict:
    """The ConfigMap a staged small file travels in: one per content, shared by the grid's runs."""
    return server.get("configmaps", NS, Names.data(p.experiment.name, key))


def on_claim(claim: Path, pod_path: str) -> Path:
    return claim / Path(pod_path).relative_to("/mnt/qlaunch")


def test_a_5mb_dataset_is_staged_once_for_a_grid_and_the_pods_read_it_there(cluster, experiment, capsys):
    server, kubelet, claim = cluster
    path, data = experiment
    p = plan(path)
    started = time.monotonic()
    report = backend().submit(p)
    took = time.monotonic() - started
    assert sorted(report.submitted) == sorted(r.run_id for r in p.runs)

    sha = hashlib.sha256(data).hexdigest()
    target = f"/mnt/qlaunch/.qlaunch/data/{sha[:16]}/train.jsonl"
    assert on_claim(claim, target).read_bytes() == data
    assert [p.name for p in on_claim(claim, target).parent.iterdir()] == ["train.jsonl"]  # no .part left
    assert len(uploads(kubelet)) == 1 and kubelet.stdin_bytes == len(data)  # one copy for both runs
    keys = set()
    for run in p.runs:
        config = pod_config(server, p, run)
        assert config["dataset"]["path"] == target
        keys.add(config["inference"]["eval_file"].removeprefix("/config/"))
        # The small eval file travels in a ConfigMap of its own, projected beside run.yaml at /config.
        assert set(server.get("configmaps", NS, Names.of(p.experiment.name, run.run_id).config)["data"]) == {"run.yaml"}
    (key,) = keys
    assert data_config_map(server, p, key)["data"] == {key: (path.parent / "data" / "eval.jsonl").read_text()}
    assert not server.list("pods", NS)  # the staging pod is gone
    err = capsys.readouterr().err
    assert f"staged onto claim {CLAIM}: {path.parent / 'data' / 'train.jsonl'} (5.0 MB) at {target}" in err
    assert "staging train.jsonl" in err  # the progress bar
    print(f"\nsubmit with a 5 MB upload through the fake: {took:.2f}s")


def test_resubmitting_sends_nothing_again_and_a_changed_file_is_a_new_copy(cluster, experiment):
    server, kubelet, claim = cluster
    path, data = experiment
    p = plan(path)
    backend().submit(p)
    sent = kubelet.stdin_bytes
    backend().submit(p, force=True)  # replaces the Jobs; the claim already holds the bytes
    assert kubelet.stdin_bytes == sent and len(uploads(kubelet)) == 1

    changed = write_dataset(path.parent / "data" / "train.jsonl", tag=" (fixed)")
    p = plan(path)
    backend().submit(p, force=True)
    old = on_claim(claim, f"/mnt/qlaunch/.qlaunch/data/{hashlib.sha256(data).hexdigest()[:16]}/train.jsonl")
    new_path = pod_config(server, p, p.runs[0])["dataset"]["path"]
    assert hashlib.sha256(changed).hexdigest()[:16] in new_path
    assert on_claim(claim, new_path).read_bytes() == changed
    assert old.read_bytes() == data  # a running job's copy is never overwritten
    assert len(uploads(kubelet)) == 2


def test_small_files_travel_in_the_config_map_without_a_pod(cluster, tmp_path):
    server, kubelet, claim = cluster
    folder = tmp_path / "small"
    write_dataset(folder / "train.jsonl", size=20_000)
    (folder / "prompts.txt").write_bytes("Caf\xe9 au lait?\n".encode("latin-1"))  # not UTF-8
    path = folder / "small.yaml"
    path.write_text(
        "name: small\nbackend: kubernetes\nstorage: {root: /mnt/qlaunch}\nkubernetes: {namespace: ml-team}\n"
        "dataset: {path: train.jsonl}\ninference: {prompts_file: prompts.txt}\n"
    )
    p = plan(path)
    backend().submit(p)
    assert not kubelet.execs and not [r for r in server.requests if "/pods/" in r["path"] and r["method"] == "PATCH"]
    config_map = server.get("configmaps", NS, Names.of("small", p.runs[0].run_id).config)
    config = load_yaml(config_map["data"]["run.yaml"])
    dataset_key = config["dataset"]["path"].removeprefix("/config/")
    assert data_config_map(server, p, dataset_key)["data"] == {dataset_key: (folder / "train.jsonl").read_text()}
    prompts_key = config["inference"]["prompts_file"].removeprefix("/config/")
    prompts = data_config_map(server, p, prompts_key)
    assert prompts_key.endswith("-prompts.txt") and "data" not in prompts
    assert base64.b64decode(prompts["binaryData"][prompts_key]) == (folder / "prompts.txt").read_bytes()


@pytest.mark.parametrize("version", ("1.30", "1.37"))
def test_rendered_objects_with_staged_files_and_the_staging_pod_are_valid(experiment, tmp_path, version):
    path, _ = experiment
    (path.parent / "data" / "eval.jsonl").write_bytes(b'{"prompt": "\xff", "reference": "x"}\n')  # binaryData
    p = plan(path)
    docs = [doc for run in p.runs for doc in run_documents(p, run)]
    assert any("binaryData" in doc for doc in docs)
    staging = stage_pod(p, p.runs[0], "qlaunch-stage-0123abcd")
    for doc in [*docs, staging]:
        kubernetes_validate.validate(json.loads(json.dumps(doc)), version, strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    # The staging pod writes as the same user the Jobs read as, on the same claim and mount.
    assert staging["spec"]["securityContext"] == job["spec"]["template"]["spec"]["securityContext"]
    assert staging["spec"]["volumes"] == [
        v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "storage"
    ]
    assert "nodeSelector" not in staging["spec"] and staging["spec"]["activeDeadlineSeconds"] > 0
    # The copies are where run.yaml says: the Jobs mount the run's ConfigMap and each data
    # file's ConfigMap as one projected volume at /config.
    config = load_yaml(
        next(d for d in docs if d["kind"] == "ConfigMap" and "run.yaml" in d.get("data", {}))["data"]["run.yaml"]
    )
    mounts = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "config", "mountPath": "/config", "readOnly": True} in mounts
    key = config["inference"]["eval_file"].removeprefix("/config/")
    assert key.startswith("data-")
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert {"configMap": {"name": Names.data(p.experiment.name, key), "items": [{"key": key, "path": key}]}} in (
        volume["projected"]["sources"]
    )


def test_dry_run_says_what_would_be_staged_and_stages_nothing(cluster, experiment):
    server, kubelet, claim = cluster
    p = plan(experiment[0])
    submission = backend().prepare(p)
    assert "1 local file (5.0 MB) to stage onto claim 'qlaunch-storage'" in submission.checked
    backend().submit(p, dry_run=True)
    assert not kubelet.execs and not server.list("pods", NS) and not list(claim.iterdir())


def _sha_flipped(argv: list[str]) -> list[str]:
    return argv[:-1] + ["0" * 64] if "qlaunch-stage" in argv else argv  # the bytes arrive changed


def _claim_read_only(argv: list[str]) -> list[str]:
    if "qlaunch-stage" not in argv:
        return argv
    return ["sh", "-c", 'cat > /dev/null; echo "mkdir: cannot create directory: Read-only file system" >&2; exit 1']


def _no_sha256sum(argv: list[str]) -> list[str]:
    # An image without coreutils: the script stops at once, without reading what is being sent.
    return ["sh", "-c", 'echo "sh: 1: sha256sum: not found" >&2; exit 127'] if "qlaunch-stage" in argv else argv


@pytest.mark.parametrize(
    "rewrite, expected",
    [
        (_sha_flipped, "exit code 3): the claim received bytes with sha256"),
        (_claim_read_only, "exit code 1): mkdir: cannot create directory: Read-only file system"),
        (_no_sha256sum, "exit code 127): sh: 1: sha256sum: not found"),
    ],
)
def test_a_failed_upload_is_one_clear_error_and_submits_nothing(cluster, experiment, rewrite, expected):
    server, kubelet, claim = cluster
    path, _ = experiment
    kubelet.rewrite = rewrite
    with pytest.raises(BackendError) as error:
        backend().submit(plan(path))
    message = str(error.value)
    assert str(path.parent / "data" / "train.jsonl") in message and expected in message
    assert "no Job was submitted" in message
    assert not server.list("jobs", NS) and not server.list("configmaps", NS)
    assert not server.list("pods", NS)  # the staging pod is deleted after an error too
    assert not [f for f in claim.rglob("*") if f.is_file()]  # nothing half-written looks complete


def test_a_staging_pod_that_cannot_start_or_exec_is_one_clear_error(cluster, experiment):
    server, kubelet, claim = cluster
    path, _ = experiment
    kubelet.pull_error = 'failed to pull image "ghcr.io/qlaunch/qlaunch-train:latest": not found'
    with pytest.raises(BackendError) as error:
        backend().submit(plan(path))
    assert "cannot start (ErrImagePull: failed to pull image" in str(error.value)
    assert "kubernetes.image" in str(error.value)
    kubelet.pull_error, kubelet.exec_forbidden = None, True
    with pytest.raises(BackendError) as error:
        backend().submit(plan(path))
    assert "forbidden to exec into staging Pod" in str(error.value) and "pods/exec" in str(error.value)
    assert not server.list("jobs", NS) and not server.list("pods", NS) and not list(claim.iterdir())


def test_an_api_server_speaking_only_v4_exec_gets_the_file_too(cluster, experiment):
    server, kubelet, claim = cluster
    kubelet.protocols = (V4,)  # no way to signal end of input: the script counts the bytes
    path, data = experiment
    p = plan(path)
    backend().submit(p)
    assert on_claim(claim, pod_config(server, p, p.runs[0])["dataset"]["path"]).read_bytes() == data


def test_cli_submit_stages_the_file_and_shows_it(cluster, experiment):
    server, kubelet, claim = cluster
    path, data = experiment
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "submit", str(path), "--skip-preflight"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "staged onto claim qlaunch-storage" in result.stderr and "train.jsonl" in result.stderr
    assert len(uploads(kubelet)) == 1 and len(server.list("jobs", NS)) == 3  # 2 trainings, 1 grid evaluation
    staged = [f for f in claim.rglob("*") if f.is_file()]
    assert [f.read_bytes() == data for f in staged] == [True]


def test_rendering_names_the_staged_paths_without_a_cluster(experiment, tmp_path):
    path, data = experiment
    written = KubernetesBackend().render(plan(path), tmp_path / "out")
    text = written[0].read_text()
    assert f"/mnt/qlaunch/.qlaunch/data/{hashlib.sha256(data).hexdigest()[:16]}/train.jsonl" in text
    assert len(text) < 100_000  # the 5 MB stay out of the manifest
    config_map = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "ConfigMap")
    assert any(key.endswith("-eval.jsonl") for key in config_map["data"])


def test_a_local_file_is_checked_here_where_it_is(cluster, experiment, capsys):
    from launcher.cli import main

    server, kubelet, claim = cluster
    path, _ = experiment
    eval_file = path.parent / "data" / "eval.jsonl"
    eval_file.write_text('{"prompt": "Capital of France?", "reference": "Paris"}\n{"prompt": broken\n')
    assert main(["submit", str(path), "--skip-preflight"]) == 2
    err = capsys.readouterr().err
    assert f"inference.eval_file: {eval_file}:2: expected a JSON object" in err  # the local path, not the claim's
    assert not kubelet.execs and not server.list("jobs", NS) and not server.list("pods", NS)
