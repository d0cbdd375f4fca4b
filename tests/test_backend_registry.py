"""What a backend is (issue #27): an abstract base a backend must complete, one registry of names
and aliases that the experiment file and `--backend` both read, and abilities the launcher asks
for instead of testing a backend's name. A new backend is a module plus one registry line."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from launcher import backends
from launcher.backends.base import Backend
from launcher.cli import main
from launcher.job.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def quickstart(folder: Path, **top) -> Path:
    shutil.copytree(REPO / "examples" / "data", folder / "data")
    data = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    data.update(top)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_backend_missing_a_method_cannot_be_made():
    class Forgetful(Backend):
        name = "forgetful"

        def prepare(self, plan, *, force=False, offline=False):
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract methods apply, cancel, logs, status"):
        Forgetful()


def test_every_name_and_alias_comes_from_the_registry(tmp_path, capsys):
    assert backends.names() == ["local", "slurm", "kubernetes", "k8s", "kube"]
    # `--backend kube` and `backend: kube` are the Kubernetes backend, named so everywhere
    path = quickstart(tmp_path, backend="kube", storage={"root": "/mnt/qlaunch"})
    assert main(["plan", str(path), "--json"]) == 0
    assert '"backend": "kubernetes"' in capsys.readouterr().out
    assert main(["render", str(path), "--backend", "kube", "--out", str(tmp_path / "out")]) == 0
    assert any(p.name.endswith(".yaml") for p in (tmp_path / "out").iterdir())
    with pytest.raises(ConfigError, match="unknown backend 'lsf' \\(choose from local, slurm, kubernetes; aliases"):
        backends.canonical("lsf")


def test_abilities_not_names_decide():
    assert backends.backend_class("slurm").shares_storage and backends.backend_class("local").grid_evaluation
    assert not backends.backend_class("k8s").shares_storage and backends.backend_class("kube").grid_evaluation


TOY = '''
    """A throw-away backend: one file, one registry line."""
    from launcher.backends.base import Backend, RunStatus, Submission, SubmitReport


    class ToyBackend(Backend):
        name = "toy"

        def prepare(self, plan, *, force=False, offline=False):
            files = {f"{run.run_id}.toy": f"train {run.run_id} in {run.run_dir}\\n" for run in plan.runs}
            return Submission(backend=self.name, files=files, jobs={r.run_id: ["toy"] for r in plan.runs})

        def apply(self, submission, options=None):
            return SubmitReport(submitted={run: ["toy-1"] for run in submission.jobs})

        def status(self, plan):
            return {run.run_id: RunStatus() for run in plan.runs}

        def logs(self, plan, run, *, follow, out, infer=False):
            out.write("toy log\\n")

        def cancel(self, plan, runs):
            return []
'''


def test_a_new_backend_is_one_module_and_one_registry_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_backend.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.REGISTRY, "toy", "toy_backend:ToyBackend")  # the one line
    path = quickstart(tmp_path / "exp", backend="toy")
    assert main(["render", str(path), "--out", str(tmp_path / "out")]) == 0
    rendered = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(rendered) == 2 and all(name.endswith(".toy") for name in rendered)
    assert main(["status", str(path)]) == 0
    assert "toy" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_start_starts_tensorboard(tmp_path):
    """`qlaunch tensorboard --start` died with NameError (an import lost in a clean-up)."""
    pytest.importorskip("tensorboard")
    path = quickstart(tmp_path)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "tensorboard", str(path), "--start", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                    assert answer.status == 200 and b"TensorBoard" in answer.read()
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail("TensorBoard did not answer within 90 s")
    finally:
        process.terminate()
        process.wait(timeout=30)
