"""`qlaunch report` for Kubernetes: the laptop cannot read the claim, so the report is built from
what the pods logged (through the real client, against tests/fake_kube), and says what it lacks."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
from fake_kube import start_cluster

from launcher import report
from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan
from launcher.job.progress import PROGRESS_PREFIX

NS = "ml-team"


def progress(event: str, step: int, when: float, **fields) -> str:
    return PROGRESS_PREFIX + json.dumps({"event": event, "time": when, "step": step, **fields}, sort_keys=True)


def submitted(path, text: str):
    """The experiment file written, planned and submitted to the fake cluster: (plan, backend)."""
    path.write_text(textwrap.dedent(text))
    p = plan(path)
    k8s = KubernetesBackend(poll_seconds=0.05)
    k8s.submit(p)
    return p, k8s


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, NS, hf_token="hf_fake")
    yield server
    server.stop()


def test_report_from_pod_logs_has_the_ledger_and_metrics_and_names_what_is_missing(fake, tmp_path, monkeypatch):
    p, k8s = submitted(
        tmp_path / "guanaco.yaml",
        """\
        name: guanaco
        backend: kubernetes
        storage:
          root: /mnt/qlaunch-not-here
        resources: {nodes: 1, gpus_per_node: 2}
        kubernetes:
          namespace: ml-team
          hf_token_secret: {name: hf-token}
        grid:
          lora.r: [16, 64]
    """,
    )
    run, other = p.runs
    names = Names.of(p.experiment.name, run.run_id)
    t = time.time() - 7200

    # First pod: 40 steps, checkpoint at 40, preempted by SIGTERM; the replacement resumes at 40.
    first = fake.start_pod(NS, names.train_job)
    fake.run_pod(NS, first)
    fake.log(
        NS,
        first,
        progress("start", 0, t + 60, total_steps=100, attempt=1, resumed_from=None, launched_at=t),
        progress("step", 20, t + 600, total_steps=100, loss=1.9, tokens_per_second=1000.0),
        progress("step", 40, t + 1200, total_steps=100, loss=1.6, tokens_per_second=1200.0),
        progress("checkpoint", 40, t + 1210, path="checkpoint-40"),
        progress("preempted", 40, t + 1210, signal="SIGTERM"),
    )
    fake.finish_pod(NS, first, exit_code=75)
    second = fake.start_pod(NS, names.train_job)
    fake.run_pod(NS, second)
    fake.log(
        NS,
        second,
        progress("start", 40, t + 1500, total_steps=100, attempt=2, resumed_from=40, launched_at=t + 1300),
        progress("step", 100, t + 3300, total_steps=100, loss=1.2, tokens_per_second=1100.0),
        progress("end", 100, t + 3310, total_steps=100, status="completed"),
    )
    fake.finish_pod(NS, second)
    fake.fail_job(NS, Names.of(p.experiment.name, other.run_id).train_job)  # the other run's training failed
    # `qlaunch status`: every training Job has ended, so it starts the grid evaluation Job, whose
    # log carries each evaluated run's inference events.
    assert k8s.reconcile(p) == ["guanaco-evaluate"]
    infer_pod = fake.start_pod(NS, "guanaco-evaluate")
    fake.run_pod(NS, infer_pod)
    metric = {"name": "json_match", "base": 0.05, "tuned": 0.8, "n": 40}
    fake.log(
        NS,
        infer_pod,
        progress("infer_end", 100, t + 3500, summary={"run_id": run.run_id, "metric": metric, "metrics": [metric]}),
    )
    fake.finish_pod(NS, infer_pod)

    monkeypatch.chdir(tmp_path)
    document = report.build(p, k8s, "kubernetes")
    out = report.default_output(p, "kubernetes")
    assert out == tmp_path / "guanaco-report"  # not the claim's path, which is not mounted here
    report.write(document, out)

    best = document.runs[0]
    assert (document.best_run, best.run_id, best.best) == (run.run_id, run.run_id, True)
    assert best.metric.model_dump() == metric
    assert [a.outcome for a in best.attempts] == ["preempted", "completed"]
    assert (best.restarts, best.steps_redone, best.attempts[1].resumed_from) == (1, 0, 40)
    assert best.lost_seconds == 200  # the replacement pod's start-up: launched t+1300, training at t+1500
    assert best.wall_seconds == 1210 + 2010  # both pods, from launch to their last event
    assert best.gpus == 2 and best.gpu_hours == round(2 * 3220 / 3600, 4)
    assert best.loss_curve == [(20, 1.9), (40, 1.6), (100, 1.2)] and best.final_loss == 1.2
    assert best.tokens_per_second == 1100.0
    assert document.runs[1].run_id == other.run_id and document.runs[1].attempts == []
    # Each run's inference state comes from the shared Job: the failed run was not evaluated.
    assert (best.infer_state, document.runs[1].infer_state) == ("completed", "cancelled")
    assert document.runs[1].metric is None
    assert k8s.status(p)[other.run_id].infer_detail == "not evaluated: training failed"
    notes = " ".join(document.notes)
    assert "pods' logs" in notes and "not mounted on this machine" in notes and "results.jsonl" in notes
    assert (out / "report.html").is_file() and (out / "loss.png").is_file() and (out / "metric.png").is_file()
    assert "not mounted on this machine" in (out / "report.md").read_text()


def test_a_pruned_job_completes_and_status_and_report_say_where_asha_stopped_it(fake, tmp_path):
    """Issue #30 on Kubernetes: a run that asha stops exits 0, so its Job completes (and frees its
    GPU); the laptop, which cannot read the claim, learns from the pod's log that it was pruned."""
    from launcher.backends.base import State
    from launcher.status_view import build_table, collect

    p, k8s = submitted(
        tmp_path / "asha.yaml",
        """\
        name: asha
        backend: kubernetes
        storage: {root: /mnt/qlaunch-not-here}
        dataset: {test_size: 0.1}
        kubernetes: {namespace: ml-team, hf_token_secret: {name: hf-token}}
        search: {strategy: asha, first_rung_steps: 10, reduction_factor: 3}
        grid:
          train.learning_rate: [0.0002, 0.00000001]
    """,
    )
    kept, stopped = p.runs
    t = time.time() - 600
    pod = fake.start_pod(NS, Names.of(p.experiment.name, stopped.run_id).train_job)
    fake.run_pod(NS, pod)
    decision = {
        "rung": 0,
        "at": 10,
        "unit": "steps",
        "value": 2.3011,
        "rank": 2,
        "competitors": 2,
        "keep": 1,
        "prune": True,
        "metric": "eval_loss",
    }
    fake.log(
        NS,
        pod,
        progress("start", 0, t, total_steps=100, attempt=1, resumed_from=None, launched_at=t - 30),
        progress("step", 10, t + 60, total_steps=100, loss=2.4, tokens_per_second=900.0),
        progress("pruned", 10, t + 70, **decision),
        progress("end", 10, t + 75, total_steps=100, status="pruned"),
    )
    fake.finish_pod(NS, pod)  # exit 0

    k8s.reconcile(p)
    assert k8s.status(p)[stopped.run_id].state == State.COMPLETED
    rows = {row.run_id: row for row in collect(p, k8s)}
    assert rows[stopped.run_id].progress.pruned["rung"] == 0
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(build_table(p, list(rows.values()), "kubernetes", width=200))
    assert "pruned @ rung 0 (eval_loss 2.3011, rank 2/2)" in console.export_text()
    assert not rows[kept.run_id].progress.pruned
    # The report, built from the pods' logs too, never crowns the stopped run for its early loss.
    document = report.build(p, k8s, "kubernetes")
    assert document.runs[-1].run_id == stopped.run_id and document.best_run != stopped.run_id
