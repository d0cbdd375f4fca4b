"""The job image runs the quickstart's training exactly as the Kubernetes manifest starts it.

The image is built for real (docker/build_test_image.sh: CPU variant on a debootstrapped base),
the experiment is the quickstart with backend kubernetes, and the training Job's pod spec as
`qlaunch render` writes it is replayed with `docker run`: its command, env, user, capabilities
and mounts, the claim played by a host folder bind-mounted at storage.root, the ConfigMap by a
folder holding its run.yaml. A SIGTERM from outside (what the kubelet sends a preempted pod)
must leave a complete checkpoint and exit 75; the Job's replacement pod, started the same way,
resumes and writes the adapter.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from container_support import build_test_image, docker_or_fail, docker_run_args
from training_support import REPO, mount_config_map, tail, wait_until

from launcher.backends.kubernetes.manifests import run_documents
from launcher.grid import plan
from launcher.job.progress import EXIT_PREEMPTED, read_events
from launcher.job.storage import RunPaths
from training.checkpoints import complete_checkpoints

pytestmark = [pytest.mark.container, pytest.mark.slow]

CLAIM_MOUNT = "/mnt/qlaunch"
STEPS = 8
POD_UID = 1000


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    docker_or_fail()
    return build_test_image(tmp_path_factory.mktemp("image") / "build.log")


def quickstart_on_kubernetes(folder: Path, image: str) -> Path:
    """examples/quickstart.yaml as a Kubernetes experiment: one grid point, a few steps, and
    checkpoints only when a signal forces one (so resuming past step 0 proves the SIGTERM's)."""
    experiment = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    experiment.pop("grid")
    experiment["backend"] = "kubernetes"
    experiment["storage"] = {"root": CLAIM_MOUNT}
    experiment["train"].update(max_steps=STEPS, save_steps=1000, logging_steps=1)
    experiment["kubernetes"] = {"image": image, "image_pull_policy": "Never"}
    # Per-run inference: the training pod's hand-off to its inference Job runs in the image too.
    experiment.setdefault("inference", {})["per_run"] = True
    path = folder / "quickstart-k8s.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    # Its data files beside it, as in examples/: local files, so submit stages them.
    for name in ("train.jsonl", "eval.jsonl"):
        (folder / "data").mkdir(exist_ok=True)
        (folder / "data" / name).write_bytes((REPO / "examples" / "data" / name).read_bytes())
    return path


def on_host(claim: Path, pod_path: str) -> Path:
    return claim / Path(pod_path).relative_to(CLAIM_MOUNT)


def test_quickstart_trains_in_the_image_as_the_manifest_starts_it(tmp_path, image):
    docker = docker_or_fail()
    the_plan = plan(quickstart_on_kubernetes(tmp_path, image))
    [run] = the_plan.runs
    documents = run_documents(the_plan, run)
    configmaps = [d for d in documents if d["kind"] == "ConfigMap"]  # run.yaml's, each data file's
    job = next(d for d in documents if d["kind"] == "Job")  # training first, then inference
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {CLAIM_MOUNT, "/config"}

    # The claim, owned by the pod's group as fsGroup would make it; the quickstart's data files
    # travel in the run's ConfigMap (qlaunch stages small local files there), mounted at /config.
    claim = tmp_path / "claim"
    claim.mkdir()
    config = mount_config_map(configmaps, tmp_path / "config", same_path=True)
    # The hand-off volume with the namespace but no token, and no API server to reach: the
    # trainer cannot start the inference Job, which must not fail the training pod.
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "namespace").write_text("default")
    subprocess.run(["chown", "-R", f"{POD_UID}:{POD_UID}", str(claim)], check=True)
    run_dir = RunPaths(on_host(claim, run.run_dir))
    log = tmp_path / "pod.log"

    def start_pod(name: str) -> subprocess.Popen:
        args = docker_run_args(pod, container, {"storage": claim, "config": config, "handoff": handoff})
        with open(log, "ab") as out:
            return subprocess.Popen(
                [docker, "run", "--rm", "--name", name, *args], stdout=out, stderr=subprocess.STDOUT
            )

    def steps() -> list[int]:
        return [e["step"] for e in read_events(run_dir.progress) if e.get("event") == "step"]

    # First pod: preempted mid-training by a SIGTERM to its PID 1 (training.launch).
    name = f"qlaunch-test-{uuid.uuid4().hex[:8]}"
    first = start_pod(name)
    try:
        wait_until(lambda: (steps() and steps()[-1] >= 2) or first.poll() is not None, 900, "step 2", interval=0.5)
        subprocess.run([docker, "kill", "--signal", "TERM", name], check=True, capture_output=True)
        assert first.wait(timeout=600) == EXIT_PREEMPTED, tail(log)
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True)
    [preempted] = [e for e in read_events(run_dir.progress) if e.get("event") == "preempted"]
    stopped_at = preempted["step"]
    # training.launch (PID 1) hands the pod's SIGTERM to the trainer as SIGUSR1.
    assert 2 <= stopped_at < STEPS, preempted
    assert [step for step, _ in complete_checkpoints(run_dir.checkpoints)] == [stopped_at]
    assert not run_dir.training_completed()

    # The Job's replacement pod: same spec, resumes from that checkpoint and finishes.
    second = start_pod(f"qlaunch-test-{uuid.uuid4().hex[:8]}")
    assert second.wait(timeout=900) == 0, tail(log)
    assert "could not start inference Job" in log.read_text() or "cannot read the" in log.read_text(), tail(log)
    starts = [e for e in read_events(run_dir.progress) if e.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, stopped_at]
    assert steps()[-1] == STEPS
    assert run_dir.training_completed()
    assert (run_dir.adapter / "adapter_model.safetensors").stat().st_size > 0
    # Everything on the claim was written by the pod's user, as on a real claim.
    assert run_dir.adapter.stat().st_uid == POD_UID
