"""Kubernetes: one grid evaluation Job per grid (issue #29), against the fake API server.

`qlaunch submit` creates it held (suspended; under Kueue gated by the
`kueue.x-k8s.io/admission-gated-by` annotation, Kueue owning spec.suspend) beside the training
Jobs; `reconcile` (what `qlaunch status`, `status --watch` and `submit` do first) releases it
once, when the last training Job of the grid has ended, whatever its end. The runs it evaluates
reach the pod in its ConfigMap (the claim is not mounted here).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from fake_kube import start_cluster

from launcher.backends.base import State
from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan
from launcher.status_view import collect

NS = "ml-team"
EVALUATE = "grid-evaluate"
GATE = "kueue.x-k8s.io/admission-gated-by"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, NS)
    yield server
    server.stop()


def _experiment(tmp_path: Path, kubernetes: str = "", runs: int = 3):
    path = tmp_path / "grid.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: grid
        backend: kubernetes
        storage: {{root: /mnt/qlaunch}}
        kubernetes: {{namespace: {NS}{kubernetes}}}
        inference: {{prompts: ["What is QLoRA?"]}}
        grid:
          lora.r: {[8 * 2**i for i in range(runs)]}
    """)
    )
    return plan(path)


def _backend() -> KubernetesBackend:
    return KubernetesBackend(poll_seconds=0.02)


def _train(p, run) -> str:
    return Names.of(p.experiment.name, run.run_id).train_job


def _releases(fake) -> list[dict]:
    """The writes that start the evaluation Job (merge patches of it)."""
    return [
        r
        for r in fake.requests
        if r["method"] == "PATCH"
        and r["path"].endswith(f"/jobs/{EVALUATE}")
        and "merge-patch" in r["headers"].get("Content-Type", "")
    ]


def _finish(fake, p, run) -> None:
    fake.finish_pod(NS, fake.start_pod(NS, _train(p, run)))


def test_the_held_evaluation_job_is_released_exactly_once_after_the_last_training_job_completed(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    report = k8s.submit(p)
    assert all(jobs == [_train(p, run), EVALUATE] for run, jobs in zip(p.runs, report.submitted.values()))
    jobs = fake.list("jobs", NS)
    assert len(jobs) == 4 and not any(j["metadata"]["name"].endswith("-infer") for j in jobs)  # no per-run Jobs
    held = fake.get("jobs", NS, EVALUATE)
    assert held["spec"]["suspend"] is True and fake.pods_of(NS, EVALUATE) == []
    # The runs file reaches the pod in the Job's ConfigMap, with each run's run.yaml beside it.
    config = fake.get("configmaps", NS, EVALUATE)["data"]
    assert config["runs.txt"].splitlines() == [f"/config/{run.run_id}.yaml" for run in p.runs]
    assert [yaml.safe_load(config[f"{run.run_id}.yaml"])["run_id"] for run in p.runs] == [r.run_id for r in p.runs]
    assert held["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == [
        "training.evaluate_grid",
        "/config/runs.txt",
    ]
    status = k8s.status(p)[p.runs[0].run_id]
    assert (status.infer_state, status.infer_detail) == (State.PENDING, "grid evaluation waits for 3 training Jobs")

    for done, run in enumerate(p.runs[:-1], 1):
        _finish(fake, p, run)
        assert collect(p, k8s, reconcile=True)[
            0
        ].status.infer_detail == f"grid evaluation waits for {3 - done} training Job" + "s" * (done == 1)
        assert fake.get("jobs", NS, EVALUATE)["spec"]["suspend"] is True and _releases(fake) == []

    _finish(fake, p, p.runs[-1])  # the last one: `qlaunch status` starts the evaluation
    rows = collect(p, k8s, reconcile=True)
    assert fake.get("jobs", NS, EVALUATE)["spec"]["suspend"] is False
    assert len(_releases(fake)) == 1 and json.loads(_releases(fake)[0]["body"]) == {"spec": {"suspend": False}}
    assert {row.status.infer_state for row in rows} == {State.PENDING} and all(
        row.status.infer_detail.startswith("grid evaluation") for row in rows
    )
    assert k8s.reconcile(p) == [] and len(_releases(fake)) == 1  # once
    k8s.submit(p)  # submit reconciles as well: still once
    assert len(_releases(fake)) == 1

    pod = fake.start_pod(NS, EVALUATE)
    fake.run_pod(NS, pod)
    assert {s.infer_state for s in k8s.status(p).values()} == {State.RUNNING}
    fake.finish_pod(NS, pod)
    assert {s.infer_state for s in k8s.status(p).values()} == {State.COMPLETED}


def test_under_kueue_qlaunch_removes_only_its_gate_and_leaves_suspend_to_kueue(fake, tmp_path):
    p, k8s = _experiment(tmp_path, ", queue_name: t4-queue", runs=2), _backend()
    k8s.submit(p)
    held = fake.get("jobs", NS, EVALUATE)
    assert held["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    assert held["metadata"]["annotations"][GATE] == "qlaunch.dev/training" and held["spec"]["suspend"] is True
    with fake.cond:  # another controller gates it too
        fake.store[("jobs", NS, EVALUATE)]["metadata"]["annotations"][GATE] = "qlaunch.dev/training,example.com/budget"
    assert k8s.status(p)[p.runs[0].run_id].infer_state == State.PENDING

    fake.complete_job(NS, _train(p, p.runs[0]))  # Kueue admitted and ran the training Jobs
    assert k8s.reconcile(p) == [] and fake.get("jobs", NS, EVALUATE)["metadata"]["annotations"][GATE].startswith(
        "qlaunch"
    )
    fake.complete_job(NS, _train(p, p.runs[1]))
    assert k8s.reconcile(p) == [EVALUATE]
    released = fake.get("jobs", NS, EVALUATE)
    assert released["metadata"]["annotations"][GATE] == "example.com/budget"  # the other gate stays
    assert released["spec"]["suspend"] is True  # Kueue, not qlaunch, resumes it once admitted
    (patch,) = _releases(fake)
    assert "suspend" not in patch["body"]
    assert k8s.reconcile(p) == [] and len(_releases(fake)) == 1


def test_a_failed_training_run_is_named_not_evaluated_and_the_others_are_evaluated(fake, tmp_path):
    p, k8s = _experiment(tmp_path, runs=2), _backend()
    k8s.submit(p)
    done, failed = p.runs
    _finish(fake, p, done)
    fake.fail_job(NS, _train(p, failed))  # the last to end failed: it still releases the evaluation
    assert k8s.reconcile(p) == [EVALUATE]
    status = k8s.status(p)
    assert (status[failed.run_id].infer_state, status[failed.run_id].infer_detail) == (
        State.CANCELLED,
        "not evaluated: training failed",
    )
    assert status[done.run_id].infer_state == State.PENDING  # the released Job, waiting for its pod
    fake.finish_pod(NS, fake.start_pod(NS, EVALUATE))
    status = k8s.status(p)
    assert status[done.run_id].infer_state == State.COMPLETED and status[failed.run_id].infer_state == State.CANCELLED
    assert EVALUATE in status[done.run_id].job_ids

    # Submitting again retrains the failed run and holds a new evaluation until it has ended.
    old = fake.get("jobs", NS, EVALUATE)["metadata"]["uid"]
    k8s.submit(p)
    renewed = fake.get("jobs", NS, EVALUATE)
    assert renewed["metadata"]["uid"] != old and renewed["spec"]["suspend"] is True


def test_submit_again_does_not_duplicate_it_and_cancel_of_the_experiment_removes_it(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    k8s.submit(p)
    uid = fake.get("jobs", NS, EVALUATE)["metadata"]["uid"]
    report = k8s.submit(p)
    assert not report.submitted and fake.get("jobs", NS, EVALUATE)["metadata"]["uid"] == uid
    applied = [
        r
        for r in fake.requests
        if r["method"] == "PATCH" and r["path"].endswith(f"/jobs/{EVALUATE}") and "dryRun" not in r["query"]
    ]
    assert len(applied) == 1 and len([j for j in fake.list("jobs", NS) if "evaluate" in j["metadata"]["name"]]) == 1

    # Cancelling some runs keeps it (it evaluates the others); cancelling the rest removes it.
    k8s.cancel(p, p.runs[:1])
    assert fake.get("jobs", NS, EVALUATE) is not None
    k8s.cancel(p, p.runs[1:])
    assert fake.get("jobs", NS, EVALUATE) is None and fake.get("configmaps", NS, EVALUATE) is None
    assert fake.list("jobs", NS) == []


def test_logs_infer_and_progress_of_a_run_come_from_the_shared_job(fake, tmp_path):
    import io

    from launcher.job.progress import PROGRESS_PREFIX

    p, k8s = _experiment(tmp_path, runs=2), _backend()
    k8s.submit(p)
    for run in p.runs:
        _finish(fake, p, run)
    k8s.reconcile(p)
    pod = fake.start_pod(NS, EVALUATE)
    fake.run_pod(NS, pod)
    first, second = p.runs
    events = [
        PROGRESS_PREFIX
        + json.dumps({"event": "infer_end", "time": 1.0, "step": 5, "summary": {"run_id": run.run_id, "prompts": 1}})
        for run in p.runs
    ]
    fake.log(NS, pod, f"run {first.run_id}: evaluated", events[0], events[1])
    fake.finish_pod(NS, pod)
    out = io.StringIO()
    k8s.logs(p, second, follow=False, out=out, infer=True)
    assert f"run {first.run_id}: evaluated" in out.getvalue()  # the grid job's log, every run in it
    k8s.status(p)  # a table refresh: status, then the progress it shows
    progress = k8s.progress_events(p)
    assert [e["summary"]["run_id"] for e in progress[first.run_id] if e["event"] == "infer_end"] == [first.run_id]
    assert [e["summary"]["run_id"] for e in progress[second.run_id] if e["event"] == "infer_end"] == [second.run_id]
