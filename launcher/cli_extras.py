"""The CLI's small conveniences: `--version`, `--set` on every experiment command, `completion`.

Kept out of cli.py so it stays argparse for the commands and printing of their results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

# The top-level packages the wheel installs. Both names are generic (a package called `launcher`
# exists on PyPI): another distribution that installs either into the same environment
# overwrites or shadows qlaunch's files. `qlaunch --version` names any such distribution.
TOP_LEVEL = ("launcher", "training")


def clashing_distributions() -> dict[str, list[str]]:
    """Top-level package → the installed distributions other than qlaunch that provide it."""
    from importlib import metadata

    provided = metadata.packages_distributions()  # ~0.1 s: only for --version
    return {
        name: sorted({dist for dist in provided.get(name, []) if dist.lower() != "qlaunch"})
        for name in TOP_LEVEL
        if any(dist.lower() != "qlaunch" for dist in provided.get(name, []))
    }


class VersionAction(argparse.Action):
    """`qlaunch --version`: version, where the code is loaded from, and any package-name clash."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(
            option_strings,
            dest=dest,
            default=default,
            nargs=0,
            help=help or "print qlaunch's version and where it is installed",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        here = Path(__file__).resolve().parent
        print(f"qlaunch {__version__} ({here}, Python {sys.version.split()[0]})")
        code = 0
        for name, dists in clashing_distributions().items():
            print(
                f"warning: the installed distribution(s) {', '.join(dists)} also provide the top-level "
                f"package {name!r}, which qlaunch installs: one overwrites or shadows the other. "
                "Install qlaunch into a virtual environment of its own.",
                file=sys.stderr,
            )
            code = 1
        parser.exit(code)


# ---- --set --------------------------------------------------------------------------------------
SET_HELP = (
    "override a key of the experiment file: dotted key, YAML value (repeatable; wins over the "
    "file and the user config), e.g. --set storage.root=/mnt/qlaunch --set grid.lora.r=[8,16]"
)


def add_set_options(sub: argparse._SubParsersAction) -> None:
    """`--set KEY=VALUE` on every subcommand that reads an experiment file (logs, cancel and infer:
    the one `-e` names, or the one the run index remembers)."""
    for command in sub.choices.values():
        if any(action.dest == "experiment" for action in command._actions):
            command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def say_user_defaults(p, console) -> None:
    """One line naming the keys the user config file filled in (the experiment file did not set them)."""
    if p.user_defaults:
        from .job.overrides import user_config_path

        console.print(f"from {user_config_path()}: {', '.join(p.user_defaults)}", soft_wrap=True, markup=False)


# ---- --force ------------------------------------------------------------------------------------
def add_yes_options(sub: argparse._SubParsersAction) -> None:
    """`--yes` beside the `--force` of `run` and `submit`: what it deletes is listed and confirmed first."""
    for name, command in sub.choices.items():
        if name in ("run", "submit"):
            command.add_argument(
                "--yes", "-y", action="store_true", help="with --force: delete the runs' outputs without asking"
            )


def force_deletions(p, backend_name: str) -> dict[str, list[str]]:
    """Run id → what `--force` deletes of it here (clear_outputs), as `name (what)` strings.
    Kubernetes keeps the claim's outputs (the runs resume from their newest checkpoint)."""
    from .backends import backend_class
    from .job.storage import RunPaths

    if not backend_class(backend_name).shares_storage:
        return {}
    found: dict[str, list[str]] = {}
    for run in p.runs:
        paths = RunPaths.of(run)
        items = []
        if paths.adapter.is_dir():
            items.append("adapter/ (the trained adapter)")
        if paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
            items.append(f"checkpoints/ ({sum(1 for _ in paths.checkpoints.iterdir())})")
        if paths.inference.is_dir():
            items.append("inference/ (answers, metrics)")
        items += [f"{path.name}" for path in (paths.metrics, paths.progress) if path.is_file()]
        if paths.attempts.is_dir():
            items.append("attempts/")
        if items:
            found[run.run_id] = items
    return found


def confirm_force(p, backend_name: str, dry_run: bool, yes: bool, console, err_console) -> bool:
    """Say what --force deletes; True to go on. A terminal is asked; elsewhere --yes is needed."""
    from rich.markup import escape

    doomed = force_deletions(p, backend_name)
    if not doomed:
        return True
    console.print(
        f"--force deletes the outputs of {len(doomed)} run{'s' if len(doomed) != 1 else ''} "
        "(they train again from step 0; run.yaml and the logs stay):"
    )
    folders = {run.run_id: run.run_dir for run in p.runs}
    for run_id, items in doomed.items():
        console.print(escape(f"  {folders[run_id]}: {', '.join(items)}"), soft_wrap=True)
    if dry_run:
        console.print("(dry run: nothing deleted)")
        return True
    if yes:
        return True
    if sys.stdin.isatty():
        answer = console.input(escape("Delete them? [y/N] ")).strip().lower()
        if answer in ("y", "yes"):
            return True
        err_console.print("nothing deleted, nothing started")
        return False
    err_console.print(
        "[red]error:[/] nothing deleted, nothing started: --force deletes trained outputs; "
        "add --yes to confirm when no terminal can ask",
        soft_wrap=True,
    )
    return False


# ---- completion ---------------------------------------------------------------------------------
COMPLETION_HELP = 'Print a shell completion script: eval "$(qlaunch completion bash)" (or zsh).'


def add_completion(command: argparse.ArgumentParser) -> None:
    command.add_argument("shell", choices=["bash", "zsh"])


def cmd_completion(args: argparse.Namespace) -> int:
    from .cli import build_parser

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return 0


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """(subcommands, subcommand → its options, subcommands whose positional is an experiment file)."""
    commands: dict[str, list[str]] = {}
    takes_file: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                commands[name] = sorted(o for a in command._actions for o in a.option_strings)
                if any(a.dest == "experiment" and not a.option_strings for a in command._actions):
                    takes_file.add(name)
    return sorted(commands), commands, takes_file


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A completion script generated from the parser (no extra package): subcommands, each
    subcommand's options, choices of `--backend` and files for experiment arguments. zsh runs
    the bash function through bashcompinit."""
    names, options, takes_file = _words(parser)
    cases = "\n".join(f'        {name}) opts="{" ".join(options[name])}" ;;' for name in names)
    script = f"""# qlaunch {__version__} completion ({shell}): eval "$(qlaunch completion {shell})"
_qlaunch() {{
    local cur prev cmd opts i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in -*) ;; *) cmd="${{COMP_WORDS[i]}}"; break ;; esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{" ".join(names)} --help --version" -- "$cur"))
        return
    fi
    case "$prev" in
        --backend|-b) COMPREPLY=($(compgen -W "local slurm kubernetes k8s" -- "$cur")); return ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")); return ;;
        --output|-o|--kubeconfig|--prompts-file|--experiment|-e) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    case "$cmd" in
{cases}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ " {" ".join(sorted(takes_file))} import " == *" $cmd "* ]]; then
        COMPREPLY=($(compgen -f -X '!*.y*ml' -- "$cur") $(compgen -d -- "$cur"))
    fi
}}
"""
    if shell == "zsh":
        script += "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
    return script + "complete -F _qlaunch qlaunch\n"
