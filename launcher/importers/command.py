"""`qlaunch import FILE | -- <sft.py args>`: the subcommand's arguments and its work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from ..job.config import Experiment
from ..job.errors import ConfigError
from ..job.experiment_file import load_yaml
from ..job.storage import atomic_write_text
from .axolotl import from_axolotl
from .core import Imported
from .render import render_check, render_experiment
from .trl_sft import from_sft_args

HELP = "Write a qlaunch experiment file from an Axolotl YAML or a trl sft.py command line."


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "source",
        nargs="+",
        metavar="SOURCE",
        help="an Axolotl config (.yaml), or after `--` the arguments of trl's examples/scripts/sft.py",
    )
    command.add_argument("-o", "--output", help="experiment file to write (default: ./<name>.yaml)")
    command.add_argument("--check", action="store_true", help="show the mapping and warnings; write nothing")
    command.add_argument("--force", action="store_true", help="overwrite the output file")


def load_source(source: list[str]) -> Imported:
    if len(source) == 1 and not source[0].startswith("--") and " " not in source[0]:
        path = Path(source[0])
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (an Axolotl config, or `-- <sft.py arguments>`)")
        return from_axolotl(path)
    return from_sft_args(source)


def validated(imported: Imported, text: str) -> Experiment:
    """The rendered file as qlaunch will load it: a source value qlaunch rejects is reported,
    naming the source key, before anything is written."""
    try:
        return Experiment.model_validate(load_yaml(text))
    except ValidationError as exc:
        sources = {m.key: m.source for m in imported.mapped}
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            origin = next((sources[k] for k in sources if key == k or key.startswith(k + ".")), None)
            problems.append(f"{origin + ' → ' if origin else ''}{key}: {error['msg']}")
        raise ConfigError(f"{imported.origin}: not valid in qlaunch: " + "; ".join(problems)) from None


def cmd_import(args: argparse.Namespace) -> int:
    imported = load_source(args.source)
    text = render_experiment(imported)
    output = Path(args.output or f"{imported.name}.yaml")
    validated(imported, text)
    if args.check:
        sys.stdout.write(render_check(imported))
        return 0
    if output.exists() and not args.force:
        raise ConfigError(f"{output}: exists (use --force to overwrite, or -o another path)")
    atomic_write_text(output, text)
    for warning in imported.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {output}: {len(imported.mapped)} keys from {imported.tool}, {len(imported.warnings)} warnings")
    return 0
