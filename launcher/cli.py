"""`qlaunch`: plan, render, run/submit, watch, logs, cancel and infer a grid of QLoRA runs.

Imports nothing of the training stack: this runs on login nodes and laptops.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from . import run_index
from .backends import State, canonical, get_backend
from .errors import QlaunchError
from .grid import Plan, plan
from .input_checks import refuse_bad_inputs

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _backend_name(args: argparse.Namespace, p: Plan) -> str:
    return canonical(getattr(args, "backend", None) or p.experiment.backend)


# ---- commands ---------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    p = plan(args.experiment)
    refuse_bad_inputs(p, _backend_name(args, p), args.skip_input_checks, err_console)
    table = Table(title=f"{p.experiment.name}: {len(p.runs)} runs", title_justify="left")
    table.add_column("run")
    for key in p.varying_keys:
        table.add_column(key, justify="right")
    table.add_column("folder")
    for run in p.runs:
        table.add_row(run.run_id, *(str(run.overrides[k]) for k in p.varying_keys), run.run_dir)
    console.print(table)
    from . import time_estimate

    console.print(time_estimate.format_table(time_estimate.estimate_grid(p.runs)))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    p = plan(args.experiment)
    refuse_bad_inputs(p, _backend_name(args, p), args.skip_input_checks, err_console)
    backend = get_backend(_backend_name(args, p))
    out = Path(args.output)
    written = backend.render(p, out)
    for path in written:
        console.print(str(path))
    console.print(f"rendered {len(p.runs)} runs for {backend.name} into {out}; nothing submitted")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    p = plan(args.experiment)
    refuse_bad_inputs(p, _backend_name(args, p), False, err_console)
    console.print(f"inputs OK: {len(p.runs)} run{'s' if len(p.runs) != 1 else ''} checked, nothing started")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    p = plan(args.experiment)
    return 0 if _preflight(p, show=True) else 1


def _preflight(p: Plan, show: bool) -> bool:
    from . import preflight

    estimates = preflight.preflight(p)
    refused = [e for e in estimates if not e.fits]
    if show or refused:
        console.print(preflight.format_table(estimates))
    if show:
        from . import speed_tips, time_estimate

        console.print(time_estimate.format_table(time_estimate.estimate_grid(p.runs)))
        for line in speed_tips.summarize(p.runs):
            console.print(f"faster: {escape(line)}")
    for estimate in refused:
        err_console.print(f"[red]{estimate.run_id} will not fit:[/] {escape(estimate.advice)}")
    return not refused


def cmd_run(args: argparse.Namespace) -> int:
    args.backend = "local"
    return cmd_submit(args)


def cmd_submit(args: argparse.Namespace) -> int:
    p = plan(args.experiment)
    refuse_bad_inputs(p, _backend_name(args, p), args.skip_input_checks, err_console)
    name = _backend_name(args, p)
    backend = get_backend(name)
    if name != "local" and not args.skip_preflight and not _preflight(p, show=False):
        err_console.print("nothing submitted (use --skip-preflight to submit anyway)")
        return 1
    run_index.record(p, name)
    if name == "local":
        return _run_locally(p, backend, args)
    report = backend.submit(p, force=args.force, dry_run=args.dry_run or False)
    for run_id, jobs in report.submitted.items():
        console.print(f"{run_id} submitted: {', '.join(jobs)}")
    for run_id, why in report.skipped.items():
        console.print(escape(f"{run_id} skipped: {why}"))
    verb = "validated (dry run)" if args.dry_run else "submitted"
    console.print(
        f"{len(report.submitted)} runs {verb}, {len(report.skipped)} skipped. "
        f"Watch: qlaunch status {p.source} --watch"
    )
    return 0


def _run_locally(p: Plan, backend, args: argparse.Namespace) -> int:
    from .status_view import build_table, collect

    def table():
        return build_table(p, collect(p, backend), "local")

    interactive = console.is_terminal
    with Live(table(), console=console, refresh_per_second=2, auto_refresh=False,
              transient=False, redirect_stdout=False) as live:  # fmt: skip
        last = [0.0]

        def on_tick():
            if interactive and time.monotonic() - last[0] > 1.0:
                live.update(table(), refresh=True)
                last[0] = time.monotonic()

        def on_event(message: str):
            live.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(message)}")

        report = backend.submit(
            p,
            force=args.force,
            dry_run=bool(args.dry_run),
            max_parallel=args.max_parallel,
            on_event=on_event,
            on_tick=on_tick,
            run_inference=not args.no_infer,
        )
        live.update(table(), refresh=True)
    if not interactive:
        console.line()  # a non-terminal Live leaves its last line open
    for run_id, why in report.skipped.items():
        console.print(escape(f"{run_id} skipped: {why}"))
    _print_inference_summaries(p)
    if report.interrupted:
        console.print(f"stopped. Resume with: qlaunch run {p.source}")
        return 130
    statuses = backend.status(p)
    failed = [r for r, s in statuses.items() if s.state != State.COMPLETED or s.infer_state == State.FAILED]
    if failed and not args.dry_run:
        err_console.print(f"[red]{len(failed)} runs did not complete:[/] {', '.join(failed)} "
                          f"(qlaunch logs RUN shows why)")
        return 1
    return 0


def _print_inference_summaries(p: Plan) -> None:
    from .storage import RunPaths, read_json

    for run in p.runs:
        summary = read_json(RunPaths.of(run).inference / "summary.json") or {}
        metric = summary.get("metric")
        if not isinstance(metric, dict) or "tuned" not in metric:
            continue
        base = f"base {metric['base']:.2f} → " if "base" in metric else ""
        others = [m for m in summary.get("metrics", [])[1:] if isinstance(m, dict) and "tuned" in m]
        also = "".join(
            f"; {m.get('name')} " + (f"{m['base']:.2f} → " if "base" in m else "") + f"{m['tuned']:.2f}" for m in others
        )
        console.print(
            f"[bold]{run.run_id}[/] {escape(' '.join(f'{k}={v}' for k, v in run.overrides.items()))}: "
            f"{escape(str(metric.get('name', 'metric')))} {base}tuned [bold green]{metric['tuned']:.2f}[/] "
            f"on {metric.get('n', '?')} held-out prompts{escape(also)}"
        )


def cmd_status(args: argparse.Namespace) -> int:
    from .status_view import build_table, collect

    p = plan(args.experiment)
    name = _backend_name(args, p)
    backend = get_backend(name)
    run_index.record(p, name)
    if not args.watch:
        console.print(build_table(p, collect(p, backend), name))
        return 0
    try:
        with Live(build_table(p, collect(p, backend), name), console=console, auto_refresh=False) as live:
            while True:
                rows = collect(p, backend)
                live.update(build_table(p, rows, name), refresh=True)
                if all(not r.status.state.active and not r.status.infer_state.active for r in rows):
                    return 0
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_logs(args: argparse.Namespace) -> int:
    p, name, runs = run_index.resolve(args.run, args.experiment)
    if len(runs) != 1:
        raise QlaunchError(f"{args.run!r} names {len(runs)} runs; logs needs one run id")
    backend = get_backend(args.backend or name)
    try:
        backend.logs(p, runs[0], follow=args.follow, out=sys.stdout, infer=args.infer)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    p, name, runs = run_index.resolve(args.target, args.experiment)
    backend = get_backend(args.backend or name)
    cancelled = backend.cancel(p, runs)
    for run_id in cancelled:
        console.print(f"{run_id} cancelled")
    console.print(f"{len(cancelled)} of {len(runs)} runs had something to cancel")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from .backends.local import infer_command, job_environment
    from .storage import RunPaths

    p, _, runs = run_index.resolve(args.run, args.experiment)
    if len(runs) != 1:
        raise QlaunchError(f"{args.run!r} names {len(runs)} runs; infer needs one run id")
    run = runs[0]
    if not RunPaths.of(run).training_completed():
        raise QlaunchError(f"run {run.run_id} has no trained adapter yet (qlaunch status {p.source})")
    extra = [part for prompt in args.prompt for part in ("--prompt", prompt)]
    if args.prompts_file:
        extra += ["--prompts-file", args.prompts_file]
    if args.merge:
        extra.append("--merge")
    if args.no_base:
        extra.append("--no-base")
    return subprocess.call(infer_command(run, extra), env=job_environment())


def cmd_tensorboard(args: argparse.Namespace) -> int:
    import shutil

    from .tracking import printable, tensorboard_command

    command = tensorboard_command(plan(args.experiment), args.port)
    if not args.start:
        console.print(printable(command), highlight=False, soft_wrap=True)
        return 0
    if shutil.which(command[0]) is None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise QlaunchError("tensorboard is not installed here: pip install tensorboard (or 'qlaunch[tracking]')")
        command[:1] = [sys.executable, "-m", "tensorboard.main"]  # installed, but not on PATH
    return subprocess.call(command)


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlaunch",
        description="Grids of QLoRA fine-tuning runs on your machine, Slurm or Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(func=func)
        return command

    def backend_option(command):
        command.add_argument("--backend", "-b", choices=["local", "slurm", "kubernetes", "k8s"],
                             help="default: the experiment file's `backend:` (local)")

    def input_checks_option(command):
        command.add_argument("--skip-input-checks", action="store_true",
                             help="do not check local paths here (only the cluster sees them); the job still checks")

    command = add("check", cmd_check, "Check the inputs every run names (files, fields, keys); start nothing.")
    command.add_argument("experiment")
    backend_option(command)

    command = add("plan", cmd_plan, "List the runs an experiment file expands to.")
    command.add_argument("experiment")
    input_checks_option(command)

    command = add("tensorboard", cmd_tensorboard, "Print (or --start) the TensorBoard command over the grid's runs.")
    command.add_argument("experiment")
    command.add_argument("--start", action="store_true", help="start TensorBoard instead of printing the command")
    command.add_argument("--port", type=int, help="TensorBoard's port (default: its own, 6006)")

    command = add("render", cmd_render, "Write each run's job script/manifest for review; submit nothing.")
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument("-o", "--output", default="rendered", help="folder (default: ./rendered)")
    input_checks_option(command)

    command = add("run", cmd_run, "Train every run of the grid on this machine, then run inference.")
    command.add_argument("experiment")
    command.add_argument("--max-parallel", "-j", type=int, help="runs at a time (default: local.max_parallel)")
    command.add_argument("--force", action="store_true", help="train completed runs again from scratch")
    command.add_argument("--no-infer", action="store_true", help="skip the inference jobs")
    command.add_argument("--dry-run", action="store_true", help="show what would run")
    command.set_defaults(skip_preflight=True)
    input_checks_option(command)

    command = add("submit", cmd_submit, "Submit the grid (training + dependent inference jobs).")
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument("--force", action="store_true", help="resubmit runs that are pending, running or completed")
    command.add_argument("--dry-run", nargs="?", const="server", choices=["server", "client"],
                         help="validate without submitting (Kubernetes: server-side dry run)")
    command.add_argument("--skip-preflight", action="store_true", help="submit runs the memory check refuses")
    command.add_argument("--max-parallel", "-j", type=int, help="local backend: runs at a time")
    command.add_argument("--no-infer", action="store_true", help="local backend: skip inference")
    input_checks_option(command)

    command = add("preflight", cmd_preflight, "Estimate each run's peak GPU memory on its target GPU.")
    command.add_argument("experiment")

    command = add("status", cmd_status, "Table of the grid: state, step, loss, ETA, restarts.")
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument("--watch", "-w", action="store_true", help="refresh until every run has ended")
    command.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")

    command = add("logs", cmd_logs, "Print a run's log (-f follows it across restarts).")
    command.add_argument("run", help="run id (or a unique prefix)")
    command.add_argument("-f", "--follow", action="store_true")
    command.add_argument("--infer", action="store_true", help="the inference job's log")
    command.add_argument("-e", "--experiment", help="experiment file (default: where the run was submitted from)")
    backend_option(command)

    command = add("cancel", cmd_cancel, "Cancel a run, or every run of an experiment.")
    command.add_argument("target", help="run id, experiment name or experiment file")
    command.add_argument("-e", "--experiment", help="experiment file")
    backend_option(command)

    command = add("infer", cmd_infer, "Generate with a trained adapter (base model + adapter from storage).")
    command.add_argument("run", help="run id (or a unique prefix)")
    command.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    command.add_argument("--prompts-file", help=".jsonl with a prompt field, or one prompt per line")
    command.add_argument("--merge", action="store_true", help="also write a merged fp16 model")
    command.add_argument("--no-base", action="store_true", help="skip the base model's answers")
    command.add_argument("-e", "--experiment", help="experiment file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QlaunchError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
