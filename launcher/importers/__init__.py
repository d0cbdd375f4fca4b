"""`qlaunch import`: an Axolotl YAML or a trl `sft.py` command line → a qlaunch experiment file.

Each importer fills an `Imported`: the qlaunch keys it set, each with where it came from, and a
warning for every source key it could not carry over (never silently dropped). `render` turns it
into a commented experiment file; the file is validated like any other before it is written.

Pure (no torch, no trl): it runs where the launcher runs.
"""

from __future__ import annotations

from .axolotl import from_axolotl
from .core import Imported, Mapped
from .render import render_check, render_experiment
from .trl_sft import from_sft_args

__all__ = ["Imported", "Mapped", "from_axolotl", "from_sft_args", "render_check", "render_experiment"]
