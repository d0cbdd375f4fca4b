"""Scoring generated answers against references (`inference.metric`).

  exact_match   the answer equals the reference (surrounding whitespace and runs of spaces ignored)
  json_match    the whole answer is JSON equal to the reference's JSON (key order ignored)
  json_match_fenced  the same, but the JSON may sit inside a ``` code fence or amid prose (the
                first JSON value in the answer is read): what a chat model that answers in
                Markdown gets credit for. json_match stays the strict headline.
  format_match  the whole answer is JSON of the reference's shape: same keys, same value types
                (a fixed output format, whatever the values)
  contains      the reference appears in the answer (case-insensitive)
  regex:<pattern>  the whole answer matches the pattern (the reference is not used)

Several metrics, comma-separated (`json_match,format_match`), are all computed; the first is the
headline (summary.json's `metric`; all of them are in `metrics`).
"""

from __future__ import annotations

import json
import re
from typing import Callable

from .errors import ConfigError

DEFAULT_METRIC = "exact_match"


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(_normalize(answer) == _normalize(reference))


def json_match(answer: str, reference: str) -> float:
    try:
        return float(json.loads(answer.strip()) == json.loads(reference))
    except ValueError:
        return 0.0


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def _embedded_json(answer: str):
    """The JSON inside the first code fence, else the first JSON value that parses in the text."""
    fence = _FENCE.search(answer)
    text = fence.group(1) if fence else answer
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text, start)[0]
            except ValueError:
                continue
    raise ValueError("no JSON in the answer")


def json_match_fenced(answer: str, reference: str) -> float:
    try:
        return float(_embedded_json(answer) == json.loads(reference))
    except ValueError:
        return 0.0


def _shape(value):
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def format_match(answer: str, reference: str) -> float:
    try:
        return float(_shape(json.loads(answer.strip())) == _shape(json.loads(reference)))
    except ValueError:
        return 0.0


def contains(answer: str, reference: str) -> float:
    return float(_normalize(reference).casefold() in _normalize(answer).casefold())


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_match": json_match,
    "json_match_fenced": json_match_fenced,
    "format_match": format_match,
    "contains": contains,
}


def get_metrics(spec: str | None) -> list[tuple[str, Callable[[str, str], float]]]:
    """`inference.metric`: one name or several, comma-separated (the first is the headline)."""
    names = [part.strip() for part in (spec or DEFAULT_METRIC).split(",") if part.strip()]
    if any(name.startswith("regex:") for name in names) and len(names) > 1:
        names = [(spec or "").strip()]  # a pattern may contain commas: then it stands alone
    return [get_metric(name) for name in names or [DEFAULT_METRIC]]


def get_metric(name: str | None) -> tuple[str, Callable[[str, str], float]]:
    name = name or DEFAULT_METRIC
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name[len("regex:") :], re.DOTALL)
        except re.error as exc:
            raise ConfigError(f"inference.metric: {name!r}: not a valid regular expression: {exc}") from None
        return name, lambda answer, _reference: float(pattern.fullmatch(answer.strip()) is not None)
    if name not in METRICS:
        known = ", ".join([*METRICS, "regex:<pattern>"])
        raise ConfigError(f"inference.metric: unknown metric {name!r} (known: {known})")
    return name, METRICS[name]
