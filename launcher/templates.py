"""Finding the project's template folders (`slurm/`, `examples/`) and rendering them.

In a checkout they are top-level folders; in an installed wheel they are packaged inside
`launcher/_data/` (pyproject's force-include), so `qlaunch` works from either.
"""

from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path

import jinja2

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`slurm` or `examples`, from the wheel or the checkout."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"qlaunch's {name}/ folder is missing from this installation")


@lru_cache(maxsize=None)
def environment(name: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir(name))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    # Every value that reaches a shell goes through |q.
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["tojson"] = lambda value: json.dumps(value, sort_keys=True)
    return env


def render(name: str, template: str, **context) -> str:
    return environment(name).get_template(template).render(**context)
