"""The run registry (`~/.qlaunch/runs.json`) and the hints qlaunch prints, through the real
`qlaunch` command (issue #33, findings 1 and 2).

- Reading commands never re-point a run: `status`, `report`, `plan`, `render` and
  `submit --dry-run` of a copy of an experiment (same run ids, another storage root) leave
  `logs <run>` and `infer <run>` on the run that was submitted.
- A run id submitted from two files is one error naming both files and `-e FILE`.
- Every hint, pasted into a shell as printed, acts on the backend of the command that printed it:
  on the test Slurm cluster, the dry run's `Submit:` hint submits to Slurm, the `Watch:` hint
  watches Slurm, and `qlaunch cancel <run>` afterwards cancels the real jobs.

Commands run through a `qlaunch` on PATH that starts this checkout's launcher, and hints through
`bash -c`, so quoting mistakes show. Paths hold spaces for the same reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.grid import plan

REPO = Path(__file__).resolve().parents[1]
HINT = re.compile(r"(?:Submit|Watch|Resume with|why): (qlaunch .*)$")


class Qlaunch:
    """`qlaunch` as a user has it: on PATH, one QLAUNCH_HOME, COLUMNS of a narrow terminal."""

    def __init__(self, folder: Path):
        self.home = folder / "qlaunch home"
        bin_dir = folder / "bin"
        bin_dir.mkdir(parents=True)
        wrapper = bin_dir / "qlaunch"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m launcher.cli "$@"\n')
        wrapper.chmod(0o755)
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **os.environ,
            "QLAUNCH_HOME": str(self.home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": pythonpath,
            "COLUMNS": "80",
            "OMP_NUM_THREADS": "1",
        }

    def __call__(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["qlaunch", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def shell(self, line: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A printed hint, pasted into a shell."""
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=self.env, timeout=timeout)

    def index(self) -> dict | None:
        path = self.home / "runs.json"
        return json.loads(path.read_text()) if path.exists() else None


def hints(output: str) -> list[str]:
    return [m.group(1) for line in output.splitlines() if (m := HINT.search(line))]


def quickstart_copy(folder: Path, name: str, storage: Path, **sections) -> Path:
    """examples/quickstart.yaml (and its data) in `folder`, with another storage root: the same
    run ids as every other copy."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data").exists():
        shutil.copytree(REPO / "examples" / "data", folder / "data")
    data = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    data["storage"] = {"root": str(storage)}
    for section, values in sections.items():
        if isinstance(values, dict):  # merged into the section; a key set to None is removed
            values = {k: v for k, v in {**data.get(section, {}), **values}.items() if v is not None}
        data[section] = values
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_only_commands(path: Path, out: Path) -> list[list[str]]:
    return [
        ["status", str(path)],
        ["status", str(path), "--json"],
        ["report", str(path), "-o", str(out / "report")],
        ["plan", str(path)],
        ["render", str(path), "-o", str(out / "rendered")],
        ["check", str(path)],
        ["submit", str(path), "--dry-run"],
        ["submit", str(path), "--dry-run", "--backend", "slurm", "--skip-preflight"],
        ["run", str(path), "--dry-run"],
    ]


# ---- finding 1: reading never re-points a run -----------------------------------------------------
def test_read_only_commands_never_write_the_run_index(tmp_path):
    qlaunch = Qlaunch(tmp_path)
    path = quickstart_copy(tmp_path / "my exps", "exp.yaml", tmp_path / "runs")
    for args in read_only_commands(path, tmp_path / "out"):
        result = qlaunch(*args, timeout=300)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        assert qlaunch.index() is None, f"qlaunch {' '.join(args)} wrote the run index"


@pytest.mark.slow
def test_reading_a_copy_leaves_logs_and_infer_of_the_original(tmp_path, tiny_experiment):
    qlaunch = Qlaunch(tmp_path)
    original = tiny_experiment(tmp_path / "original", name="tiny", train={"max_steps": 2}, inference={"enabled": False})
    result = qlaunch("run", str(original))
    assert result.returncode == 0, result.stdout + result.stderr
    data = yaml.safe_load(original.read_text())
    (run,) = plan(original).runs
    run_id, run_dir = run.run_id, Path(run.run_dir)
    train_log = (run_dir / "train.log").read_text()
    assert "QLAUNCH_PROGRESS" in train_log

    # The README's promise: a copy (another file name, another storage root) is the same run.
    copy_folder = tmp_path / "copy of it"
    copy_folder.mkdir()
    shutil.copy(original.parent / "data.jsonl", copy_folder / "data.jsonl")
    copy = copy_folder / "fresh.yaml"
    copy.write_text(yaml.safe_dump({**data, "storage": {"root": str(copy_folder / "runs")}}, sort_keys=False))
    index_before = qlaunch.index()
    for args in read_only_commands(copy, tmp_path / "out"):
        result = qlaunch(*args, timeout=300)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        assert run_id in result.stdout or args[0] in ("report", "check")

    logs = qlaunch("logs", run_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == train_log and "no log yet" not in logs.stdout
    infer = qlaunch("infer", run_id[:6], "--prompt", "What comes after 3?", "--no-base")
    assert infer.returncode == 0, infer.stdout + infer.stderr
    assert list((run_dir / "inference").glob("adhoc-*.jsonl"))
    assert not (copy_folder / "runs" / "tiny" / run_id).exists()
    assert qlaunch.index() == index_before


def failing_run(qlaunch: Qlaunch, folder: Path, name: str, storage: Path, **sections) -> Path:
    """A one-run experiment whose local job starts, writes its log and fails within seconds: a hub
    model not in the cache, offline (the launcher does not ask the hub with --no-prefetch)."""
    qlaunch.env["HF_HUB_OFFLINE"] = "1"
    return quickstart_copy(
        folder,
        name,
        storage,
        model={"name_or_path": "qlaunch-test/no-such-model", "gguf_file": None},
        grid={"train.learning_rate": [1.0e-3]},
        **sections,
    )


def test_an_index_an_older_qlaunch_re_pointed_finds_the_submitted_run_again(tmp_path):
    """Version 1 of runs.json held one entry per run id, the last reader's. Once the run is
    submitted again, its folder (which holds a log) wins over the copy only looked at."""
    qlaunch = Qlaunch(tmp_path)
    original = failing_run(qlaunch, tmp_path / "original", "exp.yaml", tmp_path / "runs a")
    copy = failing_run(qlaunch, tmp_path / "copy", "exp.yaml", tmp_path / "runs b")
    (run,) = plan(original).runs
    qlaunch.home.mkdir()
    (qlaunch.home / "runs.json").write_text(
        json.dumps(  # what `qlaunch status copy/exp.yaml` wrote
            {run.run_id: {"experiment": "quickstart", "file": str(copy), "backend": "local"}}
        )
    )
    assert qlaunch("run", str(original), "--no-prefetch").returncode == 1
    logs = qlaunch("logs", run.run_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == Path(run.run_dir, "train.log").read_text() and str(tmp_path / "runs b") not in logs.stdout
    assert len(qlaunch.index()["runs"][run.run_id]) == 2  # the old entry is kept, the submitted one wins


# ---- finding 2: hints, run verbatim, act where the command acted --------------------------------
def test_hints_after_a_local_run_on_a_slurm_file_stay_local(tmp_path):
    """`qlaunch run` of a file whose backend is Slurm: the failure hint names the local backend,
    and pasted, shows the local run's log."""
    qlaunch = Qlaunch(tmp_path)
    path = failing_run(qlaunch, tmp_path / "my exps", "exp.yaml", tmp_path / "runs a", backend="slurm")
    result = qlaunch("run", str(path), "--no-prefetch")
    assert result.returncode == 1, result.stdout + result.stderr
    (why,) = hints(result.stderr)
    assert shlex.split(why)[-2:] == ["--backend", "local"]
    shown = qlaunch.shell(why)
    assert shown.returncode == 0, shown.stderr
    entries = [e for entries in qlaunch.index()["runs"].values() for e in entries]
    assert [e["backend"] for e in entries] == ["local"]
    log = Path(entries[0]["run_dir"], "train.log").read_text()
    assert log and shown.stdout == log

    # Ctrl-C while the job starts: the Resume hint, pasted, is a command `qlaunch run` accepts.
    process = subprocess.Popen(
        ["qlaunch", "run", str(path), "--no-prefetch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=qlaunch.env,
    )
    local_state = Path(entries[0]["run_dir"], "local.json")
    deadline = time.monotonic() + 60
    while '"running"' not in (local_state.read_text() if local_state.exists() else ""):
        assert time.monotonic() < deadline and process.poll() is None, "the job never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    (resume,) = hints(out)
    assert shlex.split(resume) == ["qlaunch", "run", str(path), "--no-prefetch"]
    again = qlaunch.shell(resume)
    assert again.returncode == 1 and "why: qlaunch logs" in again.stderr, again.stdout + again.stderr


# ---- on the test Slurm cluster ------------------------------------------------------------------
def _require_cluster():
    from slurm_support import require_cluster

    require_cluster()


def _held(folder: Path, name: str, storage: Path) -> Path:
    """The quickstart as one held Slurm job pair per run: queued, listed, cancelled, never run."""
    return quickstart_copy(
        folder,
        name,
        storage,
        environment={"python": sys.executable},
        resources={"gpus_per_node": 0, "cpus_per_task": 1, "memory": "1G", "time_limit": "00:10:00"},
        slurm={"extra_directives": ["--hold"]},
    )


def _job_ids(output: str) -> dict[str, list[str]]:
    """run id → job ids, from `<run> submitted: <id>, <id>` lines."""
    found = re.findall(r"^(\w{10}) submitted: ([\d_, ]+)$", output, re.MULTILINE)
    return {run: [j.strip() for j in jobs.split(",")] for run, jobs in found}


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    from slurm_support import scheduler_jobs

    return scheduler_jobs(*job_ids)


def _scancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)


@pytest.mark.slurm
def test_hints_submit_and_watch_on_slurm_and_cancel_reaches_the_jobs(tmp_path):
    _require_cluster()
    qlaunch = Qlaunch(tmp_path)
    # The file says `backend: local`; the user picks Slurm on the command line.
    path = _held(tmp_path / "my exps", "exp one.yaml", tmp_path / "runs a")
    submitted: list[str] = []
    try:
        dry = qlaunch("submit", str(path), "--backend", "slurm", "--dry-run", "--no-prefetch")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        (submit,) = hints(dry.stdout)
        assert "--backend slurm" in submit and "--dry-run" not in submit

        result = qlaunch.shell(submit)
        assert result.returncode == 0, result.stdout + result.stderr
        jobs = _job_ids(result.stdout)
        submitted += [j for ids in jobs.values() for j in ids]
        # Training per run, and one grid evaluation job both runs name.
        assert len(jobs) == 2 and len(submitted) == 4 and len(set(submitted)) == 3, result.stdout
        (evaluation,) = {j for j in submitted if submitted.count(j) == 2}
        assert set(_slurm_states(submitted).values()) == {"PENDING"}
        (watch,) = hints(result.stdout)
        assert "--backend slurm" in watch and watch.endswith("--watch")

        # The watch hint, pasted; stopped with Ctrl-C as a user would (held jobs never end).
        process = subprocess.Popen(
            ["bash", "-c", watch],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**qlaunch.env, "COLUMNS": "200"},
            start_new_session=True,
        )
        time.sleep(8)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert "slurm" in out and out.count("pending") >= 2, out + err
        assert "unknown" not in out  # what the local backend would say of runs it never started

        # The plain `status` (the file's local backend) says where the runs went; pasted, that is Slurm.
        plain = qlaunch("status", str(path))
        assert plain.returncode == 0, plain.stderr
        (elsewhere,) = re.findall(r"submitted to slurm, not local; their status: (qlaunch .*)$", plain.stderr, re.M)
        shown = qlaunch.shell(elsewhere)
        assert shown.returncode == 0 and shown.stdout.count("pending") >= 2, shown.stdout + shown.stderr
        assert "note:" not in shown.stderr

        # `infer` of a run that has not trained says where to look; pasted, that looks at Slurm.
        run_id = sorted(jobs)[0]
        infer = qlaunch("infer", run_id, "--prompt", "hi")
        assert infer.returncode == 2 and "has no trained adapter yet" in infer.stderr, infer.stderr
        (status,) = re.findall(r"\((qlaunch status .*)\)\s*$", infer.stderr, re.MULTILINE)
        shown = qlaunch.shell(status)
        assert shown.returncode == 0 and shown.stdout.count("pending") >= 2, shown.stdout + shown.stderr

        # After following the hints: cancel by run id reaches the real Slurm jobs. The grid's
        # evaluation job stays while another run may still train; it goes with the last run.
        from slurm_support import wait_for

        for number, (run_id, ids) in enumerate(jobs.items()):
            cancel = qlaunch("cancel", run_id)
            assert cancel.returncode == 0, cancel.stderr
            assert f"{run_id} cancelled" in cancel.stdout
            own = [j for j in ids if j != evaluation]
            wait_for(lambda: set(_slurm_states(own).values()) <= {"CANCELLED"}, 30, f"jobs {own} cancelled")
            if number == 0:
                assert _slurm_states([evaluation])[evaluation] == "PENDING"
        wait_for(lambda: set(_slurm_states(submitted).values()) <= {"CANCELLED"}, 30, "the evaluation job cancelled")
    finally:
        _scancel(submitted)


@pytest.mark.slurm
def test_a_run_submitted_from_two_files_is_one_error_naming_both(tmp_path):
    _require_cluster()
    qlaunch = Qlaunch(tmp_path)
    first = _held(tmp_path / "team a", "exp.yaml", tmp_path / "runs a")
    second = _held(tmp_path / "team b", "copy.yaml", tmp_path / "runs b")
    submitted: dict[Path, dict[str, list[str]]] = {}
    try:
        for path in (first, second):
            result = qlaunch("submit", str(path), "--backend", "slurm", "--no-prefetch")
            assert result.returncode == 0, result.stdout + result.stderr
            submitted[path] = _job_ids(result.stdout)
        run_id = sorted(submitted[first])[0]
        assert run_id in submitted[second]  # the same ids: only the storage root differs

        for command in (["logs", run_id], ["cancel", run_id[:7]], ["infer", run_id, "--prompt", "hi"]):
            result = qlaunch(*command)
            assert result.returncode == 2, result.stdout + result.stderr
            assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
            assert f"run {run_id} was submitted from 2 experiment files" in result.stderr
            assert str(first) in result.stderr and str(second) in result.stderr and "-e" in result.stderr

        # The error's own example picks one; pasted, it cancels that file's jobs only.
        error = qlaunch("cancel", run_id).stderr
        (example,) = [line.split("e.g. ", 1)[1] for line in error.splitlines() if line.startswith("e.g. ")]
        assert shlex.split(example)[-2:] == ["-e", str(second)]
        cancel = qlaunch.shell(example)
        assert cancel.returncode == 0 and f"{run_id} cancelled" in cancel.stdout, cancel.stdout + cancel.stderr
        from slurm_support import wait_for

        # The run's training job goes; the copy's grid evaluation job waits for its other run.
        (training, evaluation) = submitted[second][run_id]
        # (a cancelled pending array task leaves squeue at once: gone counts as cancelled)
        wait_for(lambda: _slurm_states([training]).get(training, "CANCELLED") == "CANCELLED", 30, "copy cancelled")
        assert _slurm_states([evaluation])[evaluation] == "PENDING"
        assert set(_slurm_states(submitted[first][run_id]).values()) == {"PENDING"}
    finally:
        _scancel([j for s in submitted.values() for ids in s.values() for j in ids])


def test_a_run_started_with_set_is_found_again_by_its_id(tmp_path):
    """`qlaunch run exp.yaml --set train.max_steps=3` makes other run ids than the file alone:
    `logs <run>` afterwards, with no --set, plans the file the way the run was started and
    shows that run's log (it said the file "no longer plans" the run)."""
    qlaunch = Qlaunch(tmp_path)
    path = failing_run(qlaunch, tmp_path / "exps", "exp.yaml", tmp_path / "runs")
    result = qlaunch("run", str(path), "--no-prefetch", "--set", "train.max_steps=3")
    assert result.returncode == 1, result.stdout + result.stderr
    (run,) = plan(path, settings=("train.max_steps=3",)).runs
    assert run.run_id not in {r.run_id for r in plan(path).runs}
    log = Path(run.run_dir, "train.log").read_text()
    shown = qlaunch("logs", run.run_id)
    assert shown.returncode == 0, shown.stderr
    assert log and shown.stdout == log
