"""`qlaunch export EXP --run ID | --best [--merge] [--gguf [--gguf-type f16|q8_0]]
[--push-to-hub REPO [--private | --public]] [-o DIR] [--backend B] [--memory SIZE] [--dry-run]`:
the subcommand's arguments and its work.

Everything that can refuse is asked before the export job starts: the run exists and finished
training (`--best`: the run `qlaunch report` ranks first, which needs an evaluated run), and for
`--push-to-hub` a token (`model.hf_token_env` / `model.hf_token_file`) that the hub says can
write to the repo's namespace; for a merge, the host memory where it runs. Then the export job
(jobspec.export_job: `python -m training.export`) runs as a job of the experiment's backend
(`--backend`): on this machine, now (local), or submitted (`Backend.submit_export`, which asks
the scheduler before it queues anything: Slurm's sbatch --test-only, Kubernetes' server-side dry
run). Its last step (`finish`: here, or `python -m launcher.export_command --finish` in the job)
pushes the folder with huggingface_hub (`create_repo` + `upload_folder`) and records the export in
`<run dir>/exports.json` (report and `status --json`); in a job it also prints the record as a
progress line (`export_end`), which is how Kubernetes, whose claim this machine cannot read, shows
it. The token is passed to the client only: never printed, logged or written. On Kubernetes the
token is the Secret's (kubernetes.hf_token_secret), which never leaves the cluster: the pod asks the
hub (`--check-push`) before it merges anything.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .backends import get_backend
from .backends import names as backend_names
from .backends.base import State
from .grid import Plan, plan
from .job.config import RunConfig
from .job.errors import QlaunchError
from .job.progress import EXPORT_EVENT, emit, make_event
from .job.storage import RunPaths, read_json, write_json
from .jobspec import export_finish_command, export_job, launcher_environment, memory_mib, merge_memory_bytes

HELP = "Export a trained run: its adapter, or the merge checked against it (+ GGUF), optionally to the hub."
EXPORTS_FILE = "exports.json"
WRITE_ROLES = ("write", "admin", "contributor")


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help="experiment file")
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run id (or a unique prefix)")
    which.add_argument("--best", action="store_true", help="the run `qlaunch report` ranks first")
    command.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base (both merge bases checked; the closer ships)",
    )
    command.add_argument("--gguf", action="store_true", help="also a GGUF file for llama.cpp / Ollama (needs --merge)")
    command.add_argument("--gguf-type", choices=("f16", "q8_0"), default="f16", help="GGUF weights (default f16)")
    command.add_argument("--push-to-hub", metavar="REPO", help="push the export to this hub repo (user/name)")
    visibility = command.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_true", default=True, help="a new hub repo is private (the default)"
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="a new hub repo is public")
    command.add_argument("-o", "--output", help="export folder (default: <run dir>/export)")
    command.add_argument(
        "--backend",
        "-b",
        choices=backend_names(),
        help="where the export job runs (default: the experiment's backend; local: here, now)",
    )
    command.add_argument("--kubeconfig", help="kubernetes: kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    command.add_argument("--context", help="kubernetes: kubeconfig context (default: its current context)")
    command.add_argument(
        "--memory", metavar="SIZE", help="host memory the export job asks for, e.g. 48G (default: what the merge needs)"
    )
    command.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the job script (Kubernetes: the Job); submit and write nothing",
    )


# ---- choosing the run --------------------------------------------------------------------------
def pick_run(p: Plan, run_ref: str | None, best: bool, backend=None) -> RunConfig:
    from .runner import backend_for

    backend = backend or backend_for(p, None)
    if best:
        from . import report

        document = report.build(p, backend, backend.name)
        evaluated = [r for r in document.runs if r.metric is not None and r.metric.tuned is not None]
        if not evaluated:
            raise QlaunchError(
                f"--best: no run of {p.experiment.name} has been evaluated yet (an inference summary with a "
                f"metric, from inference.eval_file); name one with --run"
            )
        run = next(r for r in p.runs if r.run_id == document.best_run)
    else:
        [run] = p.find(run_ref or "")
    if backend.shares_storage:
        done, state = RunPaths.of(run).training_completed(), None
    else:  # the claim is not readable here: the scheduler says whether training completed
        state = backend.status(p).get(run.run_id)
        done = state is not None and state.state == State.COMPLETED
    if not done:
        state = state or backend.status(p).get(run.run_id)
        value = state.state.value if state else "unknown"
        gone = (
            "; a training Job removed by ttlSecondsAfterFinished is not known any more: export with --backend "
            "local on a machine that mounts the claim"
            if not backend.shares_storage and value == State.UNKNOWN.value
            else ""
        )
        raise QlaunchError(
            f"run {run.run_id} has not finished training (state: {value}): "
            f"nothing to export (qlaunch status {p.source} --backend {backend.name}){gone}"
        )
    return run


# ---- memory ------------------------------------------------------------------------------------
def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_merge_memory(run: RunConfig, available: int | None = None, job_memory: str | None = None) -> None:
    """Refuse a merge that this machine (or, `job_memory`, its job's `--memory`) cannot hold (a 7B model wants ~45 GiB)."""
    need = merge_memory_bytes(run)
    if job_memory is not None:
        available = int(memory_mib(job_memory) * 2**20)
    available = available_memory() if available is None else available
    if need is None or available is None or need <= available:
        return
    head = (
        f"--merge of run {run.run_id} needs about {need / 2**30:.1f} GiB of host memory (the float16 merge, "
        "checked in float32), "
    )
    if job_memory is not None:
        raise QlaunchError(
            head + f"the export job would ask for {job_memory} (--memory): ask for at least "
            f"{math.ceil(need / 2**30)}G, or leave --memory out (the job then asks for what the merge needs)"
        )
    raise QlaunchError(
        head + f"this machine has {available / 2**30:.1f} GiB available: run the export on a compute "
        "node (--backend slurm; README: After training)"
    )


# ---- the hub -----------------------------------------------------------------------------------
def push_target(run: RunConfig, repo: str) -> tuple[str, str]:
    """(full repo id, token), once the hub has said the token may write there; else one error."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .job.hub import read_hf_token

    token = read_hf_token(run)
    where = run.model.hf_token_file or f"${run.model.hf_token_env}"
    if not token:
        raise QlaunchError(f"--push-to-hub {repo}: no hub token ({where} is empty or unset); nothing was exported")
    try:
        who = HfApi().whoami(token=token, cache=False)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise QlaunchError(f"--push-to-hub {repo}: the hub refused the token from {where} (HTTP {status})") from None
    repo_id = repo if "/" in repo else f"{who['name']}/{repo}"
    namespace = repo_id.split("/")[0]
    access = (who.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        allowed = any(
            s.get("entity", {}).get("name") == namespace and "repo.write" in s.get("permissions", []) for s in scoped
        )
    else:
        orgs = {o.get("name"): o.get("roleInOrg") for o in who.get("orgs") or []}
        allowed = access.get("role") in WRITE_ROLES and (namespace == who["name"] or orgs.get(namespace) in WRITE_ROLES)
    if not allowed:
        raise QlaunchError(
            f"--push-to-hub {repo_id}: the token from {where} (user {who['name']}, role {access.get('role', '?')}) "
            f"cannot write to {namespace}/; nothing was exported"
        )
    return repo_id, token


def push(folder: Path, repo_id: str, token: str, private: bool) -> dict[str, Any]:
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, commit_message=f"qlaunch export of {folder.name}"
    )
    # An existing repo keeps its visibility: record what the hub says it is.
    private = bool(api.model_info(repo_id, revision=info.oid, token=token).private)
    return {"repo_id": repo_id, "private": private, "revision": info.oid, "url": str(url)}


# ---- the command -------------------------------------------------------------------------------
def record_export(run: RunConfig, entry: dict[str, Any]) -> None:
    """Append to `<run dir>/exports.json`: what `qlaunch report` and `status --json` show."""
    path = RunPaths.of(run).root / EXPORTS_FILE
    exports = (read_json(path) or {}).get("exports", [])
    exports = [e for e in exports if e.get("path") != entry["path"]] + [entry]
    write_json(path, {"exports": exports})


def exports_of(run: RunConfig, events: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The run's exports: `<run dir>/exports.json`, and the `export_end` progress events of its
    export jobs (`events`: Kubernetes reads them from the pod logs; the claim is not readable here).
    One entry per export folder, the file's over an event's, oldest first."""
    by_path: dict[Any, dict[str, Any]] = {}
    for event in events:
        entry = event.get("export") if event.get("event") == EXPORT_EVENT else None
        if isinstance(entry, dict):
            by_path[entry.get("path")] = entry
    exports = (read_json(RunPaths.of(run).root / EXPORTS_FILE) or {}).get("exports", [])
    by_path.update((e.get("path"), e) for e in exports if isinstance(e, dict))
    return sorted(by_path.values(), key=lambda e: e.get("at") or 0)


def run_logged(command: list[str], log: Path) -> int:
    """The export job on this machine: its output on the terminal and appended to its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            command, env=launcher_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        return process.wait()


def finish(run: RunConfig, out: Path, target: tuple[str, str] | None, private: bool) -> dict[str, Any]:
    """After training.export: push the folder (when asked) and record the export in exports.json.
    Here for a local export; in the job (`python -m launcher.export_command --finish`) otherwise."""
    record = read_json(out / "export.json") or {}
    entry: dict[str, Any] = {
        "path": str(out),
        "kind": record.get("kind"),
        "at": round(time.time(), 3),
        "merge_base": (record.get("merge_check") or {}).get("chosen"),
        "gguf": (record.get("gguf") or {}).get("file"),
    }
    if target:
        repo_id, token = target
        try:
            hub = push(out, repo_id, token, private)
        except Exception as exc:  # noqa: BLE001 - one line, the token blanked
            raise QlaunchError(f"--push-to-hub {repo_id}: {str(exc).replace(token, '***')}") from None
        record["hub"] = hub
        write_json(out / "export.json", record)
        (out / "export.json").chmod(0o644)  # as the job left it: readable by whoever uses the export
        entry["hub"] = hub
        print(f"pushed to {hub['url']} at {hub['revision']} ({'private' if hub['private'] else 'public'})", flush=True)
    record_export(run, entry)
    print(f"export of run {run.run_id}: {out}", flush=True)
    return entry


def _what(args: argparse.Namespace) -> str:
    return ("merge" + (" + GGUF " + args.gguf_type if args.gguf else "")) if args.merge else "adapter"


def cmd_export(args: argparse.Namespace) -> int:
    if args.gguf and not args.merge:
        raise QlaunchError("--gguf writes the merged model: add --merge")
    if args.memory is not None and not re.fullmatch(r"\d+[KMGT]?", args.memory):
        raise QlaunchError(f"--memory {args.memory}: a size such as 48G or 64000M")
    p = plan(args.experiment)
    backend = get_backend(
        args.backend or p.experiment.backend,
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
    )
    backend.check_export()
    run = pick_run(p, args.run, args.best, backend)
    here = backend.foreground  # the local backend: the job runs on this machine, now
    if args.merge:
        if here:
            check_merge_memory(run)
        elif args.memory:
            check_merge_memory(run, job_memory=args.memory)
    target = None
    if args.push_to_hub:
        # A job that gets its token where this machine cannot read it (a Kubernetes Secret) asks
        # the hub itself, before it merges anything (backend.export_push_check).
        target = backend.export_push_check(run, args.push_to_hub) or push_target(run, args.push_to_hub)
    out = Path(args.output).expanduser().resolve() if args.output else RunPaths.of(run).root / "export"
    job = export_job(run, str(out), args.merge, args.gguf_type if args.gguf else None, args.memory)
    if not here:
        finish_step = export_finish_command(job, target[0] if target else None, args.private)
        submitted = backend.submit_export(run, job, finish_step, dry_run=args.dry_run, plan=p)
        if args.dry_run:
            print(submitted.script, end="")
            print(
                f"# dry run: the {backend.name} export job of run {run.run_id} ({_what(args)}) above was not submitted"
                f"{'; ' + submitted.checked if submitted.checked else ''}",
                file=sys.stderr,
            )
            return 0
        from . import hints

        print(
            f"export job {submitted.job_id} of run {run.run_id} ({_what(args)}) submitted to {backend.name}: "
            f"it writes {out} and records it in exports.json when it ends; "
            + (f"script {submitted.path}" if submitted.path else submitted.checked)
        )
        print(
            f"follow it: {hints.command('logs', p, backend.name, args, run=run.run_id, extra=['--export', '-f'])}; "
            f"then: {hints.command('status', p, backend.name, args)}"
        )
        return 0
    if args.dry_run:
        print(
            f"dry run: would export run {run.run_id} ({_what(args)}) here to {out}: "
            + " ".join(job.placed(python=sys.executable).command)
        )
        return 0
    print(f"exporting run {run.run_id} ({_what(args)}) to {out}", flush=True)
    code = run_logged(job.placed(python=sys.executable).command, Path(job.log))
    if code != 0:
        error = QlaunchError(f"the export of run {run.run_id} failed (exit {code}, above); nothing was pushed")
        error.exit_code = code
        raise error
    finish(run, out, target, args.private)
    return 0


# ---- the export job's last step -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.export_command --finish RUN_YAML --out DIR [--push-to-hub REPO] [--public]`:
    run by the export job once training.export has written DIR; it ends with the record as a
    progress line (`export_end`). `--check-push RUN_YAML --push-to-hub REPO`: the job's first step
    where the token is only the job's (Kubernetes): the hub must say it may write to REPO. The token
    comes from the job's environment or model.hf_token_file, as for every job; nothing here prints it."""
    from .job.experiment_file import load_run_config

    parser = argparse.ArgumentParser(prog="python -m launcher.export_command")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--finish", metavar="RUN_YAML")
    mode.add_argument("--check-push", metavar="RUN_YAML")
    parser.add_argument("--out")
    parser.add_argument("--push-to-hub", metavar="REPO")
    parser.add_argument("--public", action="store_true")
    args = parser.parse_args(argv)
    if args.check_push and not args.push_to_hub or args.finish and not args.out:
        parser.error("--check-push needs --push-to-hub; --finish needs --out")
    try:
        if args.check_push:
            repo_id, _ = push_target(load_run_config(args.check_push), args.push_to_hub)
            print(f"the hub token may write to {repo_id}", flush=True)
            return 0
        run = load_run_config(args.finish)
        target = None
        if args.push_to_hub:
            from .job.hub import read_hf_token

            token = read_hf_token(run)
            if not token:
                raise QlaunchError(
                    f"--push-to-hub {args.push_to_hub}: the job has no hub token "
                    f"(model.hf_token_file, or ${run.model.hf_token_env} passed on by the scheduler)"
                )
            target = (args.push_to_hub, token)
        entry = finish(run, Path(args.out), target, not args.public)
        emit(make_event(EXPORT_EVENT, 0, run_id=run.run_id, export=entry), None, sys.stdout)
    except QlaunchError as exc:
        print(f"qlaunch export: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
