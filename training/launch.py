"""The training job's entrypoint on a cluster: `python -m training.launch <run.yaml>`.

It runs `accelerate launch -m training.sft <run.yaml>` (one process per GPU) and fixes the two
things `accelerate launch` alone gets wrong for preemptible jobs (accelerate 1.15, checked):

  - signals: a SIGTERM/SIGUSR1 sent to `accelerate launch` kills it and leaves the worker
    orphaned, training on without a checkpoint until SIGKILL. Here accelerate's launcher ignores
    those signals and every worker process gets SIGUSR1: checkpoint at the current step, exit 75.
  - exit codes: `accelerate launch` turns any non-zero worker exit into 1. Here a preempted run
    exits with EXIT_PREEMPTED (75), read back from the run's progress events.

Exit codes: those of `training.sft` (0 done, 75 preempted, 2 bad config, 1 failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.progress import EXIT_PREEMPTED, read_events
from launcher.storage import RunPaths

from .entrypoint import EXIT_CONFIG, load_run_or_report

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def accelerate_command(run_config: Path, processes: int, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    # Explicit values keep accelerate from warning about defaults; precision comes from the
    # run's train.fp16/bf16 (TrainingArguments overrides the launcher's setting).
    command += ["--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--mixed_precision", "no", "--quiet"]  # --quiet: no traceback for a non-zero exit
    if processes > 1:
        command.append("--multi_gpu")
    return command + extra + ["-m", "training.sft", str(run_config)]


# torchrun (accelerate's multi-process launcher) would otherwise install handlers for TERM, INT
# and HUP over the ignored ones and answer a preemption by killing the workers mid-checkpoint.
TORCHRUN_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGQUIT"}


def signal_descendants(pid: int, signum: int) -> None:
    """`signum` to every process under `pid`: torchrun starts each worker in a session of its
    own, so a signal to the launcher's process group would not reach them (Slurm signals every
    process of a step itself; a Kubernetes pod's SIGTERM reaches PID 1 alone)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in children:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _ignore_forwarded_signals() -> None:
    # Runs in the child between fork and exec: the launcher (accelerate / torchrun) ignores the
    # signals; the training workers install their own handlers, so they still get them.
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.launch",
        description="Run training.sft under accelerate launch, passing preemption signals and exit codes through.",
    )
    parser.add_argument("run_config", help="the run's run.yaml (or its run folder)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="processes (GPUs) on this node; default: resources.gpus_per_node, at most the visible GPUs, 1 without CUDA",
    )
    parser.epilog = "Options after -- go to `accelerate launch` (e.g. --num_machines, --machine_rank)."
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: argparse will not take `--`-prefixed values after an optional option.
    accelerate_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    run = load_run_or_report(args.run_config)
    if run is None:
        return EXIT_CONFIG
    paths = RunPaths.of(run)
    processes = args.processes or max(1, min(run.resources.gpus_per_node, visible_gpus() or 1))

    env = dict(os.environ)
    # `-m training.sft` must resolve whatever the job's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.update(TORCHRUN_ENV)
    started = time.time()
    child = subprocess.Popen(
        accelerate_command(Path(args.run_config).resolve(), processes, accelerate_args),
        env=env,
        preexec_fn=_ignore_forwarded_signals,
        start_new_session=True,  # its own process group: one killpg reaches every worker
    )

    def forward(signum, _frame):
        print(f"[qlaunch] got {signal.Signals(signum).name}: asking the workers to checkpoint", file=sys.stderr, flush=True)
        signal_descendants(child.pid, signal.SIGUSR1)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()
    return exit_code(code, paths, started)


def exit_code(child_code: int, paths: RunPaths, started: float) -> int:
    """The worker's real outcome, which accelerate's own exit code (0/1) hides."""
    events = [e for e in read_events(paths.progress) if (e.get("time") or 0) >= started - 1]
    last = events[-1]["event"] if events else None
    if last == "preempted":
        return EXIT_PREEMPTED
    if last == "end" or child_code == 0:
        return 0
    if child_code < 0:  # killed by a signal: the shell convention
        return 128 - child_code
    return child_code


if __name__ == "__main__":
    sys.exit(main())
