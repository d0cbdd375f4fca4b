"""launcher.runner without a subprocess: render and a dry run are the same Submission, the
pre-flight gate refuses before anything is asked or written, only a submission is recorded."""

from __future__ import annotations

import textwrap

import pytest

from launcher import cli, run_index, runner
from launcher.backends import get_backend
from launcher.grid import plan

K8S = """\
    name: rn
    backend: kubernetes
    storage: {root: /mnt/q}
    grid: {lora.r: [8, 16]}
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return tmp_path / "home"


def _plan(tmp_path, body: str):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(body))
    return plan(path)


def test_render_and_a_client_dry_run_are_the_same_submission(tmp_path, home, capsys):
    p = _plan(tmp_path, K8S)
    backend = get_backend("kubernetes")
    rendered, written = runner.render(p, backend, tmp_path / "out")
    result = runner.submit(p, backend, dry_run="client", skip_preflight=True)
    assert result.dry_run and result.submission == rendered  # files, jobs, skipped, how checked
    assert sorted(path.name for path in written) == sorted(rendered.files)
    assert {path.name: path.read_text() for path in written} == rendered.files
    assert list(rendered.jobs) == [run.run_id for run in p.runs] and not result.report.submitted

    # The CLI prints that one object both times.
    assert cli.main(["render", str(p.source), "-o", str(tmp_path / "out2")]) == 0
    render_out = capsys.readouterr().out
    assert cli.main(["submit", str(p.source), "--dry-run", "client", "--skip-preflight"]) == 0
    dry_out = capsys.readouterr().out
    for line in rendered.describe():
        assert line in render_out and line in dry_out


def test_preflight_gate_refuses_before_anything_is_asked_or_recorded(tmp_path, home):
    # bf16 on a T4 cannot run; the Slurm backend would need sbatch, which is never called.
    p = _plan(tmp_path, "name: pf\nbackend: slurm\nresources: {gpu_type: t4}\ntrain: {bf16: true}\n")
    result = runner.submit(p, get_backend("slurm"))
    assert result.exit_code == 1 and result.submission is None
    assert [e.run_id for e in result.refused] == [p.runs[0].run_id] and "train.fp16" in result.refused[0].advice
    assert not (home / "runs.json").exists() and not any(home.glob("*"))


def test_a_dry_run_records_nothing_a_submission_records_where_it_went(tmp_path, home):
    p = _plan(tmp_path, K8S)
    runner.submit(p, get_backend("kubernetes"), dry_run="client")
    assert not (home / "runs.json").exists()  # a dry run must not re-point `logs/cancel <run>`
    run_index.record(p, get_backend("kubernetes"))  # what a real submission records
    found = run_index.resolve(p.runs[0].run_id[:6], None)
    assert found.backend == "kubernetes" and [r.run_id for r in found.runs] == [p.runs[0].run_id]
    assert found.plan.source == p.source


def test_infer_without_a_trained_adapter_is_one_clear_error(tmp_path, home):
    p = _plan(tmp_path, "name: inf\nstorage: {root: runs}\n")
    with pytest.raises(runner.QlaunchError, match=f"run {p.runs[0].run_id} has no trained adapter yet"):
        runner.infer(p, p.runs[0], ["--prompt", "hi"])
