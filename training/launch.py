"""How every training job starts, on every backend: `python -m training.launch <run.yaml>`.

It runs `accelerate launch -m training.sft <run.yaml>` on this node and is the one place that
knows accelerate's flags (processes, machines, machine rank, rendezvous, precision, CPU or GPU)
and what `accelerate launch` alone gets wrong for preemptible jobs (accelerate 1.15, checked):

  - signals: a SIGTERM/SIGUSR1 sent to `accelerate launch` kills it and leaves the worker
    orphaned, training on without a checkpoint until SIGKILL. Here accelerate's launcher ignores
    those signals and the workers get ONE stop request (the signal itself for TERM/USR1, USR1
    for INT/HUP): checkpoint at the current step, exit 75. Every later signal is absorbed: Slurm
    sends USR1 and then TERM, to every process of the step, and srun forwards them again; none
    of them may cut the checkpoint short.
  - exit codes: `accelerate launch` turns any non-zero worker exit into 1. Here a preempted run
    exits with EXIT_PREEMPTED (75), read back from the run's progress events.

  - start-up: a worker ignores the stop signals until it has installed its handlers, so the
    request is also written to a file (training/stop_request.py) before any signal is sent; the
    worker reads it right after installing them. A request is never lost, whenever it comes.
  - orphans: accelerate dies with this process (PR_SET_PDEATHSIG) and each worker with its
    parent (training/worker_guard.py), so a SIGKILL of this process or of its group leaves no
    worker training. Each worker locks its rank of the run folder; an attempt whose ranks are
    still locked by live processes of an earlier one refuses to start and names them.

The machine rank comes from --machine-rank, else Slurm's SLURM_NODEID, else the Kubernetes
Indexed Job's JOB_COMPLETION_INDEX, else 0. Requeueing after exit 75 is the scheduler's (or the
batch script's) business, except in a Kubernetes pod, where nothing else is left to decide: there
the requeue guard (launcher/job/requeue.py) turns a 75 past the limits into EXIT_REQUEUES_EXHAUSTED.

Exit codes: those of `training.sft` (0 done, 75 preempted, 2 bad config, 1 failed), and 76 (the
requeue guard stopped a Kubernetes run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Nothing slow above main()'s first line: a stop signal before the handlers are installed would
# kill the job instead of stopping it, so pydantic and the run model are imported after them.
from launcher.job import requeue
from launcher.job.progress import EXIT_CONFIG, EXIT_FAILED, EXIT_PREEMPTED, read_events

from .stop_request import STOP_FILE_ENV, write_request
from .worker_guard import holders

if TYPE_CHECKING:
    from launcher.job.config import RunConfig
    from launcher.job.storage import RunPaths

from .log_noise import quiet_job_logs

# Signals that ask the job to stop; the trainer itself handles TERM and USR1.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
TRAINER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RANK_ENVIRONMENT = ("SLURM_NODEID", "JOB_COMPLETION_INDEX")
# Processes on this node when --processes is not given: e.g. data-parallel CPU processes on a
# machine without CUDA, the same multi-process tree as a multi-GPU node (what the tests use).
PROCESSES_ENV = "QLAUNCH_PROCESSES"


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def machine_rank(explicit: int | None, env: dict[str, str]) -> int:
    if explicit is not None:
        return explicit
    for name in RANK_ENVIRONMENT:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def accelerate_command(
    run: RunConfig,
    run_yaml: Path,
    *,
    gpus: int,
    rank: int,
    main_process_ip: str | None,
    main_process_port: int,
    env: dict[str, str],
    extra: list[str] = (),
) -> list[str]:
    """`accelerate launch` for this node. `gpus`: GPUs this node uses (0: CPU)."""
    nodes = run.resources.nodes
    per_node = max(gpus, 1)
    processes = nodes * per_node  # accelerate counts processes over all machines
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--num_machines", str(nodes), "--num_processes", str(processes)]
    if "OMP_NUM_THREADS" not in env:  # a thread count the job's environment sets wins
        command += ["--num_cpu_threads_per_process", str(max(1, run.resources.cpus_per_task // per_node))]
    # Explicit values keep accelerate from warning about defaults. CPU jobs compute in float32
    # (autocast on CPU is ~10x slower); on GPUs the run's train.fp16/bf16.
    precision = "fp16" if gpus and run.train.fp16 else "bf16" if gpus and run.train.bf16 else "no"
    command += ["--mixed_precision", precision, "--dynamo_backend", "no"]
    command.append("--quiet")  # no traceback for a non-zero exit
    if processes > 1:
        # torchrun, one process per GPU; without CUDA one per CPU slot, which
        # training/arguments.py makes a gloo data-parallel job (use_cpu).
        command.append("--multi_gpu")
    elif not gpus:
        command.append("--cpu")
    if nodes > 1:
        if not main_process_ip:
            raise SystemExit(f"error: run {run.run_id} has {nodes} nodes: --main-process-ip is required")
        command += [
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            main_process_ip,
            "--main_process_port",
            str(main_process_port),
        ]
    return command + list(extra) + ["-m", "training.sft", str(run_yaml)]


# torchrun (accelerate's multi-process launcher) would otherwise install handlers for TERM, INT
# and HUP over the ignored ones and answer a preemption by killing the workers mid-checkpoint.
# torchrun >= 2.9 takes the list from its --signals-to-handle option (default from
# PET_SIGNALS_TO_HANDLE) and writes it over TORCHELASTIC_SIGNALS_TO_HANDLE: set both.
TORCHRUN_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGQUIT", "PET_SIGNALS_TO_HANDLE": "SIGQUIT"}


def signal_descendants(pid: int, signum: int, skip_group: int | None = None) -> None:
    """`signum` to every process under `pid` outside `skip_group` (already signalled): torchrun
    starts each worker in a session of its own, so a signal to the launcher's process group does
    not reach them (Slurm signals every process of a step itself; a Kubernetes pod's SIGTERM
    reaches PID 1 alone)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in children:
        try:
            if skip_group is None or os.getpgid(process.pid) != skip_group:
                process.send_signal(signum)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


PR_SET_PDEATHSIG = 1
# How long an earlier attempt's workers get to die (their parent watch, a scheduler's kill)
# before a new attempt refuses to start beside them.
EARLIER_ATTEMPT_GRACE_S = 15.0


def _start_launcher_child(parent: int):
    """Runs in the child between fork and exec. accelerate / torchrun ignore the stop signals
    (the training workers install their own handlers, so they still get them), and they die
    with training.launch, however it dies."""

    def prepare() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # died before prctl took effect
                os._exit(128 + int(signal.SIGKILL))

    return prepare


class StopForwarder:
    """Signal handler of training.launch: the first stop signal becomes one stop request to
    the workers; later ones are absorbed (logged, never forwarded, never fatal)."""

    def __init__(self) -> None:
        self.group: int | None = None  # the workers' process group, once started
        self.child: int | None = None  # accelerate launch's pid, once started
        self.received: int | None = None
        self.forwarded = False
        self._echo: int | None = None  # the signal we sent to our own group (see main)
        self.request_file: Path | None = None  # read by workers that start after the signal

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, _frame) -> None:
        if self.received is not None:
            if signum == self._echo:
                self._echo = None  # our own request, reaching us through our group
                return
            _say(f"got {signal.Signals(signum).name} while the workers checkpoint: ignored, they finish first")
            return
        self.received = signum
        if self.group is None:
            return  # before the workers exist: main() starts none
        self.forward(signum)

    def forward(self, signum: int) -> None:
        if self.forwarded:
            return
        self.forwarded = True
        request = signum if signum in TRAINER_SIGNALS else signal.SIGUSR1
        _say(f"got {signal.Signals(signum).name}: asking the workers to checkpoint and stop")
        if self.request_file is not None:  # first the file, then the signal: see stop_request
            try:
                write_request(self.request_file, request)
            except OSError as exc:
                _say(f"could not write the stop request file ({exc}): signalling only")
        if self.group == os.getpgrp():
            self._echo = request
        try:
            os.killpg(self.group, request)
        except ProcessLookupError:
            pass
        if self.child is not None:
            signal_descendants(self.child, request, skip_group=self.group)


def _say(message: str) -> None:
    try:
        print(f"[qlaunch] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # a closed log stream must not turn a preemption into a crash


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(training.launch's options, what follows `--` for accelerate launch)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.launch",
        description="Run training.sft under accelerate launch on this node, passing preemption signals and exit codes through.",
    )
    parser.add_argument("run_config", help="the run's run.yaml (or its run folder)")
    processes = os.environ.get(PROCESSES_ENV, "")
    parser.add_argument(
        "--processes",
        type=int,
        default=int(processes) if processes.isdigit() else None,
        help=f"GPUs (processes) on this node; default: ${PROCESSES_ENV}, else resources.gpus_per_node, "
        "at most the visible GPUs; 0 or no CUDA: one CPU process",
    )
    parser.add_argument(
        "--machine-rank",
        type=int,
        default=None,
        help="this node's rank; default: $SLURM_NODEID, $JOB_COMPLETION_INDEX, 0",
    )
    parser.add_argument("--main-process-ip", help="host of rank 0 (multi-node runs)")
    from launcher.job.protocol import MAIN_PROCESS_PORT

    parser.add_argument("--main-process-port", type=int, default=MAIN_PROCESS_PORT)
    parser.epilog = "Options after -- go to `accelerate launch` as they are."
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: argparse will not take `--`-prefixed values after an optional option.
    if "--" in argv:
        return parser.parse_args(argv[: argv.index("--")]), argv[argv.index("--") + 1 :]
    return parser.parse_args(argv), []


def processes_on_this_node(args: argparse.Namespace, run: RunConfig) -> int:
    """GPUs this node uses (0: one CPU process)."""
    if args.processes is not None:
        return args.processes
    return min(run.resources.gpus_per_node, visible_gpus()) if run.resources.gpus_per_node else 0


def node_command(args: argparse.Namespace, extra: list[str], run: RunConfig, env: dict[str, str]) -> list[str]:
    """The accelerate command for this node, from the options and the run config."""
    return accelerate_command(
        run,
        Path(args.run_config).resolve(),
        gpus=processes_on_this_node(args, run),
        rank=machine_rank(args.machine_rank, env),
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
        env=env,
        extra=extra,
    )


def main(argv: list[str] | None = None) -> int:
    # Handlers first: a signal that comes while the run config loads must not kill us either.
    stop = StopForwarder()
    stop.install()
    quiet_job_logs()  # its environment (progress bars off in a log) reaches the workers
    args, accelerate_args = parse_args(argv)
    from launcher.job.storage import RunPaths

    from .entrypoint import load_run_or_report

    run = load_run_or_report(args.run_config)
    if run is None:
        return EXIT_CONFIG
    paths = RunPaths.of(run)
    env = dict(os.environ)
    command = node_command(args, accelerate_args, run, env)
    busy = earlier_attempt_workers(paths, args, run, env, stop)
    if busy:
        _say(
            f"run {run.run_id} is still being trained by an earlier attempt: {'; '.join(h.describe() for h in busy)}. "
            "Not starting a second writer of its folder: stop those processes first."
        )
        return EXIT_FAILED
    if stop.received is not None:
        _say(f"got {signal.Signals(stop.received).name} before training started: stopping")
        return EXIT_PREEMPTED
    request_dir = Path(tempfile.mkdtemp(prefix="qlaunch-stop-"))
    stop.request_file = request_dir / "request"
    env[STOP_FILE_ENV] = str(stop.request_file)
    try:
        return run_workers(command, env, stop, run, paths, args)
    finally:
        shutil.rmtree(request_dir, ignore_errors=True)


def run_workers(
    command: list[str],
    env: dict[str, str],
    stop: StopForwarder,
    run: RunConfig,
    paths: RunPaths,
    args: argparse.Namespace,
) -> int:
    # One stop request must reach accelerate and every worker. As the leader of its own process
    # group (the local backend's process, a container's PID 1) training.launch keeps them in
    # that group, so that whoever stops the job by group (the local backend's SIGKILL on a second
    # Ctrl-C) reaches them all; otherwise (started from a shell script or a test) they get a
    # session of their own, and forwarding never signals the caller's group.
    own_group = os.getpgrp() == os.getpid()
    env.update(TORCHRUN_ENV)
    started_from = requeue.newest_checkpoint(paths.root)
    started = time.time()
    child = subprocess.Popen(
        command, env=env, preexec_fn=_start_launcher_child(os.getpid()), start_new_session=not own_group
    )
    stop.child = child.pid  # before the group: a signal in between sees no group and waits
    stop.group = os.getpgrp() if own_group else child.pid
    if stop.received is not None:  # arrived while the child was starting
        stop.forward(stop.received)
    code = exit_code(child.wait(), paths, started)
    if code == EXIT_PREEMPTED:
        code = requeue_guard(run, paths, started_from, machine_rank(args.machine_rank, env), env)
    if code == 0 and machine_rank(args.machine_rank, env) == 0:
        # Kubernetes: the final adapter is written, so the run's inference Job may start now.
        from .handoff import release_after_training

        release_after_training(env)
    return code


def earlier_attempt_workers(
    paths: RunPaths, args: argparse.Namespace, run: RunConfig, env: dict[str, str], stop: StopForwarder
) -> list:
    """Live processes that hold this node's ranks of the run (an earlier attempt's workers),
    after giving them EARLIER_ATTEMPT_GRACE_S to die."""
    per_node = max(processes_on_this_node(args, run), 1)
    first = machine_rank(args.machine_rank, env) * per_node
    ranks = range(first, first + per_node)
    deadline = time.monotonic() + EARLIER_ATTEMPT_GRACE_S
    while (busy := holders(paths.root, ranks)) and time.monotonic() < deadline and stop.received is None:
        time.sleep(0.5)
    return busy


def requeue_guard(run: RunConfig, paths: RunPaths, started_from: int | None, rank: int, env: dict[str, str]) -> int:
    """Exit 75 on Kubernetes, where the pod itself is what decides (launcher/job/requeue.py): 75 gets
    the pod replaced, EXIT_REQUEUES_EXHAUSTED fails the Job (its podFailurePolicy). Rank 0
    decides for all (the other ranks' 75 is ignored while its code fails the Job). Elsewhere
    (no job identity: Slurm's batch script decides, the local backend never requeues) 75."""
    job = env.get(requeue.JOB_ENV, "")
    if not job or rank != 0:
        return EXIT_PREEMPTED
    res = run.resources
    try:
        reason = requeue.decide(paths.root, job, started_from, res.max_requeues, res.max_requeues_without_progress)
    except OSError as exc:  # an unwritable run folder must not turn a checkpoint into a failure
        _say(f"could not record this stop for the requeue guard ({exc}): asking to be restarted")
        return EXIT_PREEMPTED
    if reason is None:
        return EXIT_PREEMPTED
    _say(f"checkpoint saved; {reason}. `qlaunch submit` resumes the run")
    return requeue.EXIT_REQUEUES_EXHAUSTED


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
