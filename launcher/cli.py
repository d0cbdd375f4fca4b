"""`qlaunch`: plan, render, run/submit, watch, logs, cancel and infer a grid of QLoRA runs.

Imports nothing of the training stack: this runs on login nodes and laptops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import cli_extras, evaluate_command, export_command, hints, run_index, runner
from .backends import Submission, canonical, get_backend
from .backends import names as backend_names
from .backends.base import WAITING, Foreground
from .grid import Plan, plan
from .importers import command as import_command
from .input_checks import refuse_bad_inputs
from .job.errors import QlaunchError
from .status_view import format_value, output_width, plain_streams

console = Console(highlight=False, width=output_width())  # a pipe gets whole tables
err_console = Console(stderr=True, highlight=False)


def _backend_name(args: argparse.Namespace, p: Plan) -> str:
    return canonical(getattr(args, "backend", None) or p.experiment.backend)


def _backend(args: argparse.Namespace, name: str):
    """The backend by name; Kubernetes talks to --kubeconfig / --context when given."""
    return get_backend(name, kubeconfig=getattr(args, "kubeconfig", None), context=getattr(args, "context", None))


# ---- commands ---------------------------------------------------------------------------------
def _print_json(document: dict) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def cmd_plan(args: argparse.Namespace) -> int:
    p = plan(args.experiment, args.set)
    refuse_bad_inputs(p, _backend_name(args, p), args.skip_input_checks, err_console)
    if args.json:
        from .json_output import plan_document

        _print_json(plan_document(p, canonical(p.experiment.backend)))
        return 0
    table = Table(title=f"{p.experiment.name}: {len(p.runs)} runs", title_justify="left")
    table.add_column("run")
    for key in p.varying_keys:
        table.add_column(key, justify="right")
    table.add_column("folder")
    for run in p.runs:
        table.add_row(run.run_id, *(Text(format_value(run.overrides[k])) for k in p.varying_keys), run.run_dir)
    console.print(table)
    from . import time_estimate

    console.print(time_estimate.format_table(time_estimate.estimate_grid(p.runs)))
    return 0


def _print_submission(submission: Submission) -> None:
    for line in submission.describe():
        console.print(escape(line), soft_wrap=True)


def cmd_render(args: argparse.Namespace) -> int:
    p = plan(args.experiment, args.set)
    refuse_bad_inputs(p, _backend_name(args, p), args.skip_input_checks, err_console)
    backend = _backend(args, _backend_name(args, p))
    out = Path(args.output)
    submission, written = runner.render(p, backend, out)
    for path in written:
        console.print(str(path))
    cli_extras.say_user_defaults(p, console)
    _print_submission(submission)
    console.print(f"rendered {len(p.runs)} runs for {backend.name} into {out}; nothing submitted")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    p = plan(args.experiment, args.set)
    refuse_bad_inputs(p, _backend_name(args, p), False, err_console)
    cli_extras.say_user_defaults(p, console)
    console.print(f"inputs OK: {len(p.runs)} run{'s' if len(p.runs) != 1 else ''} checked, nothing started")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    p = plan(args.experiment, args.set)
    estimates, refused = runner.preflight_refusals(p)
    _print_estimates(estimates, refused, show=True, runs=p.runs)
    return 1 if refused else 0


def _print_estimates(estimates: list, refused: list, show: bool, runs=()) -> None:
    from . import preflight

    if show or refused:
        console.print(preflight.format_table(estimates))
    if show:
        from . import speed_tips, time_estimate

        console.print(time_estimate.format_table(time_estimate.estimate_grid(runs)))
        for line in speed_tips.summarize(runs):
            console.print(f"faster: {escape(line)}")
    for estimate in refused:
        err_console.print(f"[red]{estimate.run_id} will not fit:[/] {escape(estimate.advice)}")


def cmd_run(args: argparse.Namespace) -> int:
    args.backend = "local"
    return cmd_submit(args)


def cmd_submit(args: argparse.Namespace) -> int:
    p = plan(args.experiment, args.set)
    name = _backend_name(args, p)
    refuse_bad_inputs(p, name, args.skip_input_checks, err_console)
    backend = _backend(args, name)
    if args.force and not cli_extras.confirm_force(p, name, bool(args.dry_run), args.yes, console, err_console):
        return 2
    prepare = None if args.no_prefetch or args.dry_run or not backend.shares_storage else _prefetch
    if backend.foreground:
        return _run_here(p, backend, args, prepare)
    result = runner.submit(
        p, backend, force=args.force, dry_run=args.dry_run or False, skip_preflight=args.skip_preflight, prepare=prepare
    )
    if result.submission is None:
        _print_estimates([], result.refused, show=False)
        err_console.print("nothing submitted (use --skip-preflight to submit anyway)")
        return result.exit_code
    if result.dry_run:
        _print_submission(result.submission)
        again = hints.flags(args, "force", "skip_preflight", "skip_input_checks", "no_prefetch")
        _print_hint(
            "validated (dry run), nothing submitted. Submit: ", hints.command("submit", p, name, args, extra=again)
        )
        return result.exit_code
    report = result.report
    for run_id, jobs in report.submitted.items():
        console.print(f"{run_id} submitted: {', '.join(jobs)}")
    for run_id, why in report.skipped.items():
        if why != WAITING:  # said once, in a note
            console.print(escape(f"{run_id} skipped: {why}"))
    for note in report.notes:
        console.print(escape(note), soft_wrap=True)
    _print_hint(
        f"{len(report.submitted)} runs submitted, {len(report.skipped)} skipped. Watch: ",
        hints.command("status", p, name, args, extra=["--watch"]),
    )
    return result.exit_code


def _print_hint(before: str, command: str, out: Console | None = None) -> None:
    """A command to paste: never wrapped, never read as markup."""
    (out or console).print(escape(before + command), soft_wrap=True)


def _prefetch(p: Plan) -> Plan:
    from . import prefetch  # hub models and datasets pinned and downloaded once, before any job

    return prefetch.prefetch_for_submit(p, say=lambda message: console.print(escape(message)))


def _run_here(p: Plan, backend, args: argparse.Namespace, prepare=None) -> int:
    """A backend that runs the jobs in this process: a live table while they run."""
    from .status_view import ProgressLines, build_table, collect, print_progress

    def table():
        return build_table(p, collect(p, backend), backend.name, width=console.width)

    interactive = console.is_interactive  # a pipe, a file, TERM=dumb: plain progress lines instead
    progress_lines = ProgressLines()
    with Live(
        table(), console=console, refresh_per_second=2, auto_refresh=False, transient=False, redirect_stdout=False
    ) as live:
        last = [0.0]

        def on_tick():
            if interactive and time.monotonic() - last[0] > 1.0:
                live.update(table(), refresh=True)
                last[0] = time.monotonic()
            elif not interactive and progress_lines.due():
                print_progress(live.console, progress_lines(collect(p, backend)))

        def on_event(message: str):
            live.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(message)}")

        options = Foreground(
            max_parallel=args.max_parallel, run_inference=not args.no_infer, on_event=on_event, on_tick=on_tick
        )
        result = runner.submit(
            p, backend, force=args.force, dry_run=bool(args.dry_run), foreground=options, prepare=prepare
        )
        live.update(table(), refresh=True)
    if not interactive:
        console.line()  # a non-terminal Live leaves its last line open
    if result.dry_run:
        _print_submission(result.submission)
        return result.exit_code
    for run_id, why in result.report.skipped.items():
        console.print(escape(f"{run_id} skipped: {why}"))
    _print_inference_summaries(p)
    if result.exit_code == runner.EXIT_INTERRUPTED:
        again = hints.flags(args, "no_infer", "no_prefetch", "skip_input_checks")  # never --force: it restarts
        again += ["--max-parallel", str(args.max_parallel)] if args.max_parallel else []
        _print_hint("stopped. Resume with: ", hints.command("run", p, "local", args, extra=again))
    elif result.failed:
        err_console.print(
            f"[red]{len(result.failed)} runs did not complete:[/] {', '.join(result.failed)}", soft_wrap=True
        )
        _print_hint("why: ", hints.command("logs", p, backend.name, args, run=result.failed[0]), err_console)
    return result.exit_code


def _print_inference_summaries(p: Plan) -> None:
    from .job.storage import RunPaths, read_json

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


def _note_submitted_elsewhere(args: argparse.Namespace, p: Plan, name: str) -> None:
    """Looking with the file's backend at runs submitted to another: say where they are (reads
    the run index, never writes it)."""
    submitted = None if args.backend else run_index.submitted_to(p)
    if submitted and canonical(submitted.backend) != name:
        _print_hint(
            f"note: these runs were submitted to {canonical(submitted.backend)}, not {name}; their status: ",
            hints.command("status", p, submitted.backend, submitted),
            err_console,
        )


def cmd_status(args: argparse.Namespace) -> int:
    from .status_view import PIPE_WIDTH, build_table, collect, print_plain_refresh, status_document

    p = plan(args.experiment, args.set)
    name = _backend_name(args, p)
    backend = _backend(args, name)
    _note_submitted_elsewhere(args, p, name)
    if args.json:
        _print_json(status_document(p, collect(p, backend, reconcile=True), name))
        return 0
    if args.check_hub:
        from .prefetch import hub_check_lines

        for line in hub_check_lines(p):
            console.print(escape(line))
    out = Console(highlight=False, width=PIPE_WIDTH) if args.wide else console  # --wide: every column
    width = None if args.wide else console.width
    if args.top_up and not args.watch:
        raise QlaunchError(
            "--top-up queues runs at each refresh of --watch: use both (qlaunch status --watch --top-up)"
        )
    if args.top_up and backend.foreground:
        raise QlaunchError(f"--top-up is for a scheduler's queue limits; the {name} backend runs jobs here, not queued")
    if not args.watch:
        out.print(build_table(p, collect(p, backend, reconcile=True), name, width=width))
        return 0

    def topped_up(say):  # --top-up: each refresh queues the runs that wait for room, as submit does
        return (lambda: runner.top_up(p, backend, say)) if args.top_up else None

    try:
        if not console.is_interactive:  # a pipe, a file, TERM=dumb: one whole table per refresh
            runner.watch(
                p,
                backend,
                lambda rows: print_plain_refresh(out, build_table(p, rows, name, width=width)),
                args.interval,
                topped_up(lambda line: out.print(escape(line), soft_wrap=True)),
            )
            return 0
        with Live(
            build_table(p, collect(p, backend, reconcile=True), name, width=console.width),
            console=console,
            auto_refresh=False,
        ) as live:
            runner.watch(
                p,
                backend,
                lambda rows: live.update(build_table(p, rows, name, width=console.width), refresh=True),
                args.interval,
                topped_up(lambda line: live.console.print(escape(line), soft_wrap=True)),
            )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    from . import prefetch

    p = prefetch.prefetch(
        plan(args.experiment, args.set), say=lambda message: console.print(escape(message)), command=True
    )
    pinned = {(pin.repo_type, pin.repo_id, pin.revision) for run in p.runs for pin in run.hub_pins}
    console.print(f"{len(pinned)} hub repos pinned for {len(p.runs)} runs; their jobs read them offline")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    p = plan(args.experiment, args.set)
    name = _backend_name(args, p)
    _note_submitted_elsewhere(args, p, name)
    found = None
    if args.audit:
        from .audit import audit

        backend = _backend(args, name)
        if not backend.shares_storage:
            raise QlaunchError(
                "--audit trains the stopped runs on this machine from their checkpoints, which "
                f"the {name} backend's storage does not let it read"
            )
        if not backend.foreground and not args.here:  # a login node is no place to train
            raise QlaunchError(
                f"--audit trains the stopped runs on this machine, like `qlaunch run`, not as {name} jobs: run "
                "it on a machine with the GPU the runs need (a compute node), with --here, e.g. "
                f"srun --gres=gpu:1 --pty {hints.command('report', p, name, args, extra=['--audit', '--here'])}"
            )
        found = audit(p, lambda line: err_console.print(escape(line), highlight=False, soft_wrap=True))
    document = report.build(p, _backend(args, name), name, audit=found)
    document = report.write(document, Path(args.output) if args.output else report.default_output(p, name))
    if args.json:
        _print_json(document.model_dump(mode="json"))
    else:
        report.print_summary(console, document)
    return 0


def _submitted_backend(args: argparse.Namespace, found: run_index.Resolved):
    """The backend (and cluster) the runs were submitted to, unless --backend/--kubeconfig/--context say."""
    if not args.backend:
        args.kubeconfig = args.kubeconfig or found.kubeconfig
        args.context = args.context or found.context
    return _backend(args, args.backend or found.backend)


def cmd_logs(args: argparse.Namespace) -> int:
    found = run_index.resolve(args.run, args.experiment, command="logs", settings=args.set)
    p, runs = found.plan, found.runs
    if len(runs) != 1:
        raise QlaunchError(f"{args.run!r} names {len(runs)} runs; logs needs one run id")
    backend = _submitted_backend(args, found)
    try:
        if args.export:
            backend.export_logs(runs[0], follow=args.follow, out=sys.stdout, plan=p)
        else:
            backend.logs(p, runs[0], follow=args.follow, out=sys.stdout, infer=args.infer)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    found = run_index.resolve(args.target, args.experiment, command="cancel", settings=args.set)
    p, runs = found.plan, found.runs
    backend = _submitted_backend(args, found)
    cancelled = backend.cancel(p, runs)
    for run_id in cancelled:
        console.print(f"{run_id} cancelled")
    console.print(f"{len(cancelled)} of {len(runs)} runs had something to cancel")
    return 0


def cmd_throttle(args: argparse.Namespace) -> int:
    """`qlaunch throttle EXP K`: how many tasks of each of the grid's Slurm arrays run at once."""
    p = plan(args.experiment, args.set)
    if _backend_name(args, p) != "slurm":
        raise QlaunchError("throttle changes Slurm job arrays: use it with --backend slurm")
    if args.limit < 0:
        raise QlaunchError(f"throttle: {args.limit} is not a number of tasks (0: no throttle)")
    arrays = _backend(args, "slurm").throttle(p, args.limit)
    if not arrays:
        console.print("no array of this experiment has tasks queued or running: nothing to change")
        return 0
    limit = f"at most {args.limit} tasks at once" if args.limit else "no throttle"
    console.print(f"arrays {', '.join(arrays)}: {limit} (slurm.array_parallelism sets it for the next submit)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    found = run_index.resolve(args.run, args.experiment, command="infer", settings=args.set)
    p, runs = found.plan, found.runs
    if len(runs) != 1:
        raise QlaunchError(f"{args.run!r} names {len(runs)} runs; infer needs one run id")
    extra = [part for prompt in args.prompt for part in ("--prompt", prompt)]
    if args.prompts_file:
        extra += ["--prompts-file", args.prompts_file]
    if args.merge:
        extra.append("--merge")
    if args.no_base:
        extra.append("--no-base")
    return runner.infer(p, runs[0], extra, submitted=found)


def cmd_tensorboard(args: argparse.Namespace) -> int:
    import shutil

    from .tracking import printable, tensorboard_command

    command = tensorboard_command(plan(args.experiment, args.set), args.port)
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
    parser.add_argument("--version", action=cli_extras.VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # bare `qlaunch`: the help (main)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(func=func)
        return command

    def backend_option(command):
        command.add_argument(
            "--backend", "-b", choices=backend_names(), help="default: the experiment file's `backend:` (local)"
        )
        command.add_argument("--kubeconfig", help="kubernetes: kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
        command.add_argument("--context", help="kubernetes: kubeconfig context (default: its current context)")

    def input_checks_option(command):
        command.add_argument(
            "--skip-input-checks",
            action="store_true",
            help="do not check local paths here (only the cluster sees them); the job still checks",
        )

    command = add("check", cmd_check, "Check the inputs every run names (files, fields, keys); start nothing.")
    command.add_argument("experiment")
    backend_option(command)

    def json_option(command):
        command.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document instead (shape: README, Machine-readable output)",
        )

    command = add("plan", cmd_plan, "List the runs an experiment file expands to.")
    command.add_argument("experiment")
    input_checks_option(command)
    json_option(command)

    command = add("tensorboard", cmd_tensorboard, "Print (or --start) the TensorBoard command over the grid's runs.")
    command.add_argument("experiment")
    command.add_argument("--start", action="store_true", help="start TensorBoard instead of printing the command")
    command.add_argument("--port", type=int, help="TensorBoard's port (default: its own, 6006)")

    command = add("render", cmd_render, "Write each run's job script/manifest for review; submit nothing.")
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument("-o", "--output", default="rendered", help="folder (default: ./rendered)")
    input_checks_option(command)

    command = add("run", cmd_run, "Train every run of the grid on this machine, then evaluate them all in one job.")
    command.add_argument("experiment")
    command.add_argument("--max-parallel", "-j", type=int, help="runs at a time (default: local.max_parallel)")
    command.add_argument(
        "--force",
        action="store_true",
        help="train completed runs again from scratch (deletes their adapters: listed, confirmed)",
    )
    command.add_argument("--no-infer", action="store_true", help="skip the inference jobs")
    command.add_argument("--dry-run", action="store_true", help="show what would run")
    command.set_defaults(skip_preflight=True)
    input_checks_option(command)
    command.add_argument("--no-prefetch", action="store_true", help="skip pinning/downloading hub repos first")

    command = add(
        "submit", cmd_submit, "Submit the grid: its training (Slurm: job arrays) and one evaluation job after it."
    )
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument(
        "--force",
        action="store_true",
        help="resubmit runs that are pending, running or completed "
        "(local/Slurm: deletes their outputs, listed and confirmed first)",
    )
    command.add_argument(
        "--dry-run",
        nargs="?",
        const="server",
        choices=["server", "client"],
        help="validate without submitting (Kubernetes: server-side dry run)",
    )
    command.add_argument("--skip-preflight", action="store_true", help="submit runs the memory check refuses")
    command.add_argument("--max-parallel", "-j", type=int, help="local backend: runs at a time")
    command.add_argument("--no-infer", action="store_true", help="local backend: skip inference")
    input_checks_option(command)
    command.add_argument(
        "--no-prefetch",
        action="store_true",
        help="skip pinning/downloading hub repos first (jobs then reach the hub themselves)",
    )

    command = add(
        "prefetch",
        cmd_prefetch,
        "Pin the grid's hub models/datasets to commits and download them once into the shared cache.",
    )
    command.add_argument("experiment")

    command = add("preflight", cmd_preflight, "Estimate each run's peak GPU memory on its target GPU.")
    command.add_argument("experiment")

    command = add("status", cmd_status, "Table of the grid: state, step, loss, ETA, restarts.")
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument("--watch", "-w", action="store_true", help="refresh until every run has ended")
    command.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    command.add_argument(
        "--top-up",
        action="store_true",
        help="with --watch: each refresh queues the runs that wait for room in the queue (as `qlaunch submit` "
        "again would: only what is missing, never twice) and says what it queued",
    )
    command.add_argument(
        "--wide",
        action="store_true",
        help="every column, however wide (a narrow terminal otherwise hides some and says which; "
        "a live --watch on a terminal always fits it)",
    )
    command.add_argument(
        "--check-hub",
        action="store_true",
        help="ask the hub whether the pinned revisions have moved on (changes nothing)",
    )
    json_option(command)

    command = add(
        "report",
        cmd_report,
        "Compare the runs: report.html (table, loss curves, base vs tuned, restarts), report.md, report.json.",
    )
    command.add_argument("experiment")
    backend_option(command)
    command.add_argument(
        "-o", "--output", help="folder (default: <storage root>/<experiment>/report; Kubernetes: ./<experiment>-report)"
    )
    command.add_argument(
        "--audit",
        action="store_true",
        help="search.strategy asha: finish the runs it stopped (copies beside the grid, trained "
        "here from their rung checkpoints) and say whether the winner would have changed",
    )
    command.add_argument(
        "--here",
        action="store_true",
        help="with --audit, for a Slurm experiment: train on this machine (a compute node) anyway",
    )
    json_option(command)

    command = add("logs", cmd_logs, "Print a run's log (-f follows it across restarts).")
    command.add_argument("run", help="run id (or a unique prefix)")
    command.add_argument("-f", "--follow", action="store_true")
    which_log = command.add_mutually_exclusive_group()
    which_log.add_argument("--infer", action="store_true", help="the inference job's log")
    which_log.add_argument("--export", action="store_true", help="the export job's log (qlaunch export)")
    command.add_argument("-e", "--experiment", help="experiment file (default: where the run was submitted from)")
    backend_option(command)

    command = add("cancel", cmd_cancel, "Cancel a run, or every run of an experiment.")
    command.add_argument("target", help="run id, experiment name or experiment file")
    command.add_argument("-e", "--experiment", help="experiment file")
    backend_option(command)

    command = add("throttle", cmd_throttle, "Slurm: change how many tasks of the grid's arrays run at once.")
    command.add_argument("experiment")
    command.add_argument("limit", type=int, help="tasks per array at once (0: no throttle)")
    backend_option(command)

    command = add("infer", cmd_infer, "Generate with a trained adapter (base model + adapter from storage).")
    command.add_argument("run", help="run id (or a unique prefix)")
    command.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    command.add_argument("--prompts-file", help=".jsonl with a prompt field, or one prompt per line")
    command.add_argument("--merge", action="store_true", help="also write a merged fp16 model")
    command.add_argument("--no-base", action="store_true", help="skip the base model's answers")
    command.add_argument("-e", "--experiment", help="experiment file")

    import_command.add_arguments(add("import", import_command.cmd_import, import_command.HELP))
    evaluate_command.add_arguments(add("evaluate", evaluate_command.cmd_evaluate, evaluate_command.HELP))
    export_command.add_arguments(add("export", export_command.cmd_export, export_command.HELP))
    cli_extras.add_completion(add("completion", cli_extras.cmd_completion, cli_extras.COMPLETION_HELP))
    cli_extras.add_set_options(sub)  # --set KEY=VALUE on every command that reads an experiment file
    cli_extras.add_yes_options(sub)  # --yes: what --force deletes is listed and confirmed
    return parser


def main(argv: list[str] | None = None) -> int:
    plain_streams()  # a non-UTF-8 terminal: ASCII arrows, not a UnicodeEncodeError
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
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
