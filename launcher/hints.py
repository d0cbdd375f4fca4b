"""The commands qlaunch suggests (`Watch: qlaunch status …`, `Submit: qlaunch submit …`).

A hint is pasted as printed, so it must act on what the command that printed it acted on: the
same experiment file, backend, cluster and storage. It carries `--backend` when the backend is
not the file's own `backend:`, and every option in TARGET_OPTIONS that was given (an option that
changes where runs go or which runs they are, e.g. a storage root or key overrides, belongs there),
each word shell-quoted.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Iterable

from .backends import canonical
from .grid import Plan

# argparse dest → option: what picks the cluster or the runs; carried by every hint.
TARGET_OPTIONS = (("kubeconfig", "--kubeconfig"), ("context", "--context"))


def target_words(p: Plan, backend: str, args: object | None = None, verb: str = "") -> list[str]:
    """`args`: the command's argparse namespace, or anything with the TARGET_OPTIONS attributes
    (run_index.Resolved: where a run was submitted)."""
    words = []
    # `qlaunch run` is the local backend, whatever the file says, and takes no --backend.
    if verb != "run" and canonical(backend) != canonical(p.experiment.backend):
        words += ["--backend", canonical(backend)]
    for setting in getattr(p, "settings", ()):  # `--set KEY=VALUE`: the plan was built with them
        words += ["--set", setting]
    for dest, option in TARGET_OPTIONS:
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list) else [value]:
            if item not in (None, False):
                words += [option] if item is True else [option, str(item)]
    return words


def command(
    verb: str, p: Plan, backend: str, args: object | None = None, *, run: str | None = None, extra: Iterable[str] = ()
) -> str:
    """`qlaunch <verb> <file|run -e file> <target options> <extra>`, ready to paste into a shell."""
    where = [run, "-e", str(p.source)] if run else [str(p.source)]
    return shlex.join(["qlaunch", verb, *where, *target_words(p, backend, args, verb), *extra])


def flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The boolean options among `names` (argparse dests) that were given, as options again."""
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, False) is True]
