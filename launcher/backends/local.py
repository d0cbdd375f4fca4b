"""The local backend (the default): each grid point is a subprocess on this machine, running the
same entrypoints with the same storage layout a cluster job would, at most N at a time; then one
evaluation job for the grid's trained runs (launcher.evaluation), or with `inference.per_run:
true` each run's own inference job as soon as it has trained.

Children run in their own session, so a terminal Ctrl-C reaches only qlaunch, which forwards
SIGTERM: the trainer checkpoints and exits with EXIT_PREEMPTED, and `qlaunch run` resumes later.
A second Ctrl-C kills them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from .. import evaluation
from ..grid import Plan
from ..job import grid_evaluation
from ..job.config import RunConfig
from ..job.hub import offline_env
from ..job.progress import EXIT_PREEMPTED
from ..job.search import pruned_decision, pruned_text
from ..job.storage import RunPaths, read_json, write_json, write_run_config
from ..jobspec import JobSpec, inference_job, job_specs, launcher_environment
from ..logs import follow_file
from .base import Backend, Foreground, RunStatus, State, Submission, SubmitReport

STATE_FILE = "local.json"


def _state_path(run: RunConfig) -> Path:
    return RunPaths.of(run).root / STATE_FILE


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def command(spec: JobSpec, extra: tuple[str, ...] = ()) -> list[str]:
    """A job spec as a process on this machine: run by this qlaunch's own python. Local jobs
    inherit this shell's environment (environment.variables and .setup are for cluster jobs)."""
    return spec.placed(python=sys.executable, args=extra).command


def train_command(run: RunConfig) -> list[str]:
    return command(job_specs(run).train)


def infer_command(run: RunConfig, extra: list[str] | None = None) -> list[str]:
    return command(inference_job(run), tuple(extra or ()))


@dataclass(frozen=True)
class _Request:
    plan: Plan
    force: bool


@dataclass
class _Job:
    run: RunConfig
    phase: str  # "train" | "infer" | "evaluate"
    process: subprocess.Popen
    log: IO[bytes]
    runs: tuple[RunConfig, ...] = ()  # evaluate: the runs the grid evaluation job evaluates


class LocalBackend(Backend):
    name = "local"
    foreground = True

    # ---- prepare / apply (runs in the foreground) ------------------------------------------
    def prepare(self, plan: Plan, *, force: bool = False, offline: bool = False) -> Submission:
        """One reviewable shell script per run; the phase each run starts with (a completed run
        only runs its inference; --force trains again from scratch)."""
        files = {}
        for run in plan.runs:
            lines = [
                "#!/bin/sh",
                f"# qlaunch local run {plan.experiment.name}/{run.run_id} {_describe(run)}",
                "set -e",
                shlex.join(train_command(run)),
            ]
            if run.inference.enabled and evaluation.per_run(run, self.name):
                lines.append(shlex.join(infer_command(run)))
            files[f"{run.run_id}.sh"] = "\n".join(lines) + "\n"
        graded = [run for run in plan.runs if run.inference.enabled and not evaluation.per_run(run, self.name)]
        if graded:
            files["evaluate.sh"] = (
                "\n".join(
                    [
                        "#!/bin/sh",
                        f"# qlaunch local grid evaluation {plan.experiment.name}: after the grid's training, the runs",
                        f"# that trained (listed in {grid_evaluation.folder(graded) / grid_evaluation.RUNS_FILE}), base model loaded once",
                        shlex.join(
                            evaluation.local_command(graded, grid_evaluation.folder(graded) / grid_evaluation.RUNS_FILE)
                        ),
                    ]
                )
                + "\n"
            )
        jobs: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        for run in plan.runs:
            paths = RunPaths.of(run)
            state = read_json(_state_path(run)) or {}
            if state.get("state") == "running" and _pid_alive(state.get("pid")):
                skipped[run.run_id] = f"already running (pid {state['pid']})"
            elif paths.training_completed() and not force:
                if pruned_decision(paths.metrics):
                    skipped[run.run_id] = "stopped early by asha"
                elif run.inference.enabled and not paths.inference_completed():
                    jobs[run.run_id] = [self._inference_phase(run)]
                else:
                    skipped[run.run_id] = "completed"
            else:
                jobs[run.run_id] = ["train", self._inference_phase(run)] if run.inference.enabled else ["train"]
        return Submission(self.name, files, jobs, skipped, "runs on this machine", request=_Request(plan, force))

    def _inference_phase(self, run: RunConfig) -> str:
        return "infer" if evaluation.per_run(run, self.name) else "evaluate"

    def apply(self, submission: Submission, options: Foreground | None = None) -> SubmitReport:
        request: _Request = submission.request
        plan, options = request.plan, options or Foreground()
        report = SubmitReport(skipped=dict(submission.skipped))
        say = options.on_event or (lambda message: None)
        on_tick, run_inference = options.on_tick, options.run_inference
        limit = options.max_parallel or plan.experiment.local.max_parallel
        todo: list[tuple[RunConfig, str]] = []
        waiting: list[RunConfig] = []  # trained, for the grid evaluation job once training is done
        for run in start_order(plan):
            phases = submission.jobs.get(run.run_id)
            if not phases:
                continue
            if request.force:
                RunPaths.of(run).clear_outputs()
                _state_path(run).unlink(missing_ok=True)
            if phases[0] in ("infer", "evaluate") and not run_inference:
                report.skipped[run.run_id] = "completed"
                continue
            if phases[0] == "evaluate":
                waiting.append(run)
            else:
                todo.append((run, phases[0]))
        for run in [run for run, _ in todo] + waiting:
            write_run_config(run)
            self._set_state(run, "pending")

        running: list[_Job] = []
        stopping = {"count": 0}

        def on_sigint(signum, frame):
            stopping["count"] += 1
            sig = signal.SIGTERM if stopping["count"] == 1 else signal.SIGKILL
            if stopping["count"] == 1:
                say(
                    "stopping: runs save a checkpoint and stop; `qlaunch run` again resumes them (Ctrl-C again to kill)"
                )
            for job in running:
                if sig == signal.SIGKILL:
                    _kill_tree(job.process)
                else:
                    _signal_group(job.process, sig)

        previous = {s: signal.signal(s, on_sigint) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while todo or running or waiting:
                while todo and len(running) < limit and not stopping["count"]:
                    run, phase = todo.pop(0)
                    if (read_json(_state_path(run)) or {}).get("state") == "cancelled":
                        report.skipped[run.run_id] = "cancelled"
                        continue
                    running.append(self._start(run, phase))
                    report.submitted.setdefault(run.run_id, []).append(str(running[-1].process.pid))
                    say(f"{run.run_id} {phase} started (pid {running[-1].process.pid}) {_describe(run)}")
                for job in list(running):
                    code = job.process.poll()
                    if code is None:
                        continue
                    running.remove(job)
                    job.log.close()
                    if job.phase == "evaluate":
                        self._evaluation_finished(job, code, say)
                        continue
                    follow_up = self._finished(job, code, say)
                    if follow_up and run_inference and not stopping["count"]:
                        if evaluation.per_run(job.run, self.name):
                            todo.insert(0, (job.run, "infer"))
                        else:
                            waiting.append(job.run)
                if waiting and not todo and not running and not stopping["count"]:
                    running.append(self._start_evaluation(waiting))
                    for run in waiting:
                        report.submitted.setdefault(run.run_id, []).append(str(running[-1].process.pid))
                    say(
                        f"grid evaluation of {len(waiting)} runs started (pid {running[-1].process.pid}): "
                        f"base model loaded once; log {grid_evaluation.folder(waiting) / grid_evaluation.LOG_FILE}"
                    )
                    waiting = []
                if stopping["count"] and not running:
                    for run in [run for run, _ in todo] + waiting:
                        self._set_state(run, "stopped", returncode=EXIT_PREEMPTED)
                    todo.clear()
                    waiting = []
                if on_tick:
                    on_tick()
                time.sleep(0.3)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        report.interrupted = bool(stopping["count"])
        return report

    def _start(self, run: RunConfig, phase: str) -> _Job:
        paths = RunPaths.of(run)
        log_path = paths.train_log if phase == "train" else paths.infer_log
        log = open(log_path, "ab")
        command = train_command(run) if phase == "train" else infer_command(run)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**launcher_environment(), **offline_env(run)},  # offline once prefetched
            cwd=paths.root,
            start_new_session=True,
        )
        self._set_state(run, "running", phase=phase, pid=process.pid, started=time.time())
        return _Job(run, phase, process, log)

    def _start_evaluation(self, runs: list[RunConfig]) -> _Job:
        """One process evaluates every run (training.evaluate_grid); each run's state points at it."""
        place = grid_evaluation.folder(runs)
        runs_file = evaluation.write_runs_file(runs, place)
        log = open(place / grid_evaluation.LOG_FILE, "ab")
        process = subprocess.Popen(
            evaluation.local_command(runs, runs_file),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**launcher_environment(), **offline_env(runs[0])},
            cwd=place,
            start_new_session=True,
        )
        for run in runs:
            self._set_state(run, "running", phase="infer", pid=process.pid, started=time.time(), grid=True)
        return _Job(runs[0], "evaluate", process, log, tuple(runs))

    def _evaluation_finished(self, job: _Job, code: int, say: Callable[[str], None]) -> None:
        outcomes = evaluation.outcomes(job.runs)
        for run in job.runs:
            if (read_json(_state_path(run)) or {}).get("state") == "cancelled":
                say(f"{run.run_id} evaluation cancelled")
                continue
            outcome = outcomes.get(run.run_id, {})
            if outcome.get("outcome") in ("evaluated", "skipped") and RunPaths.of(run).inference_completed():
                self._set_state(run, "completed", phase="infer", returncode=0)
                say(f"{run.run_id} evaluated")
            elif code == EXIT_PREEMPTED or code < 0 and not outcome:
                self._set_state(run, "stopped", phase="infer", returncode=code)
            else:
                why = outcome.get("why") or f"the evaluation job exited with {code}"
                self._set_state(run, "failed", phase="infer", returncode=code or 1, detail=why)
                say(
                    f"{run.run_id} not evaluated: {why}; see {grid_evaluation.folder(job.runs) / grid_evaluation.LOG_FILE}"
                )

    def _finished(self, job: _Job, code: int, say: Callable[[str], None]) -> bool:
        """Record how a job ended; True when the run's inference job should follow."""
        run = job.run
        current = read_json(_state_path(run)) or {}
        if current.get("state") == "cancelled":
            say(f"{run.run_id} {job.phase} cancelled")
            return False
        if code == 0:
            self._set_state(run, "completed", phase=job.phase, returncode=0)
            pruned = pruned_decision(RunPaths.of(run).metrics) if job.phase == "train" else None
            if pruned:
                say(f"{run.run_id} {job.phase} stopped early by asha: {pruned_text(pruned)}; not evaluated")
                return False
            say(f"{run.run_id} {job.phase} completed")
            return job.phase == "train" and run.inference.enabled
        if code == EXIT_PREEMPTED:
            self._set_state(run, "stopped", phase=job.phase, returncode=code)
            say(f"{run.run_id} {job.phase} stopped after a checkpoint (exit {code}); it resumes on the next run")
            return False
        self._set_state(run, "failed", phase=job.phase, returncode=code)
        log = "infer.log" if job.phase == "infer" else "train.log"
        say(f"{run.run_id} {job.phase} FAILED (exit {code}); see {RunPaths.of(run).root / log}")
        return False

    def _set_state(self, run: RunConfig, state: str, **fields) -> None:
        data = {"state": state, "host": socket.gethostname(), "updated": time.time(), **fields}
        write_json(_state_path(run), data)

    # ---- watch ----------------------------------------------------------------------------------
    def status(self, plan: Plan) -> dict[str, RunStatus]:
        return {run.run_id: self._status(run) for run in plan.runs}

    def _status(self, run: RunConfig) -> RunStatus:
        paths = RunPaths.of(run)
        local = read_json(_state_path(run)) or {}
        state_name = local.get("state")
        phase = local.get("phase", "train")
        alive = state_name == "running" and _pid_alive(local.get("pid"))
        job_ids = [str(local["pid"])] if local.get("pid") else []
        status = RunStatus(job_ids=job_ids)
        if paths.training_completed():
            status.state = State.COMPLETED
            if paths.inference_completed():
                status.infer_state = State.COMPLETED
            elif phase == "infer":
                status.infer_state = _local_state(state_name, alive, local.get("returncode"))
            elif state_name == "pending":
                status.infer_state = State.PENDING
            return status
        status.state = _local_state(state_name, alive, local.get("returncode"))
        if status.state == State.REQUEUED:
            status.detail = "stopped after a checkpoint; `qlaunch run` resumes it"
        elif status.state == State.FAILED:
            # "process gone": it died with no exit recorded (qlaunch killed, the machine rebooted).
            status.detail = (
                f"exit {local.get('returncode')}" if "returncode" in local else "process gone; `qlaunch run` resumes it"
            )
        return status

    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        paths = RunPaths.of(run)
        path = evaluation.infer_log(run, "local") if infer else paths.train_log

        def active() -> bool:
            return self._status(run).state in (State.RUNNING, State.PENDING) or (
                infer and self._status(run).infer_state in (State.RUNNING, State.PENDING)
            )

        follow_file(path, out, follow=follow, active=active)

    def cancel(self, plan: Plan, runs: list[RunConfig]) -> list[str]:
        cancelled = []
        for run in runs:
            local = read_json(_state_path(run)) or {}
            if local.get("state") not in ("running", "pending"):
                continue
            self._set_state(run, "cancelled", phase=local.get("phase", "train"), pid=local.get("pid"))
            pid = local.get("pid")
            if local.get("state") == "running" and _pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)  # checkpoint, then stop
                except ProcessLookupError:
                    pass
            cancelled.append(run.run_id)
        return cancelled


def _local_state(name: str | None, alive: bool, returncode: int | None) -> State:
    if name == "running":
        return State.RUNNING if alive else State.FAILED
    if name == "pending":
        return State.PENDING
    if name == "stopped":
        return State.REQUEUED
    if name == "cancelled":
        return State.CANCELLED
    if name == "failed":
        return State.FAILED
    if name == "completed":
        return State.COMPLETED
    return State.UNKNOWN


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def start_order(plan: Plan) -> list[RunConfig]:
    """The order runs start in. A grid's own order puts all values of its first key together
    (every run of a bad learning rate first); asha compares each run with those that reached a
    rung before it, so an asha grid starts in an order that mixes them: by a hash of each run's
    grid values (the same order on every machine, whatever the paths)."""
    if plan.experiment.search.strategy != "asha":
        return list(plan.runs)

    def mixed(run: RunConfig) -> str:
        return hashlib.sha256(json.dumps(run.overrides, sort_keys=True, default=str).encode()).hexdigest()

    return sorted(plan.runs, key=mixed)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the job and every process under it. Its group alone is not enough: torchrun
    starts each worker of a multi-process run in a session of its own."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    _signal_group(process, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _describe(run: RunConfig) -> str:
    return " ".join(f"{key}={value}" for key, value in run.overrides.items())
