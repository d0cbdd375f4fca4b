"""How sure the report may be: per-prompt scores, 95% intervals and the paired test between the
top two runs (`qlaunch report`). Pure Python (math only), deterministic: the same run folders
give the same report, byte for byte.

- Per run and metric: the mean over the held-out examples with its 95% **Wilson score interval**
  (every metric scores an answer 0 or 1; Wilson stays inside [0, 1] and behaves at 0/n and n/n,
  where the textbook ±1.96·sqrt(p(1-p)/n) interval collapses to a point).
- The leader against the runner-up, **paired** on the prompts both answered: only the prompts
  where they differ carry information. The two-sided exact **sign test** on those (for 0/1
  scores this is McNemar's exact test) gives p; p ≥ 0.05 means the lead is within sampling noise
  and the report says so in a sentence instead of crowning a winner. Paired beats comparing the
  two intervals: both runs answer the same prompts, so an easy prompt helps both alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Z95 = 1.959963984540054
ALPHA = 0.05

# Prompt identity across runs: the same held-out example is the same (prompt, reference).
Key = tuple[str, str]


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (successes may be a sum of 0/1 scores)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` vs `losses` under 50/50 (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Scores:
    """One run's per-prompt scores: metric name → who ("base"/"tuned") → {prompt key: score}."""

    by_metric: dict[str, dict[str, dict[Key, float]]]


def read_scores(results: Path, metric_spec: str | None) -> Scores | None:
    """Every configured metric, per held-out example, from inference/results.jsonl (the answers
    and references are there; the job stored only the headline's score per row, so the others are
    scored again with the job's own functions). None when the file is missing or has no example."""
    try:
        lines = results.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("kind") == "eval" and isinstance(row.get("reference"), str):
            rows.append(row)
    if not rows:
        return None
    metrics = _metric_functions(metric_spec)
    by_metric: dict[str, dict[str, dict[Key, float]]] = {}
    for index, (name, score) in enumerate(metrics):
        per_who: dict[str, dict[Key, float]] = {}
        for who in ("base", "tuned"):
            values: dict[Key, float] = {}
            for row in rows:
                if not isinstance(row.get(who), str):
                    continue
                stored = row.get(f"{who}_score") if index == 0 else None  # the job's own headline score
                if isinstance(stored, (int, float)):
                    values[(row["prompt"], row["reference"])] = float(stored)
                elif score is not None:
                    values[(row["prompt"], row["reference"])] = score(row[who], row["reference"])
            if values:
                per_who[who] = values
        if per_who:
            by_metric[name] = per_who
    return Scores(by_metric) if by_metric else None


def _metric_functions(spec: str | None) -> list[tuple[str, Callable[[str, str], float] | None]]:
    try:
        from launcher.job.metrics import get_metrics  # light: json and re only
    except ImportError:  # a launcher without the job side: the headline's stored scores only
        return [((spec or "exact_match").split(",")[0].strip(), None)]
    try:
        return get_metrics(spec)
    except Exception:  # noqa: BLE001 - a metric the job refused never scored anything
        return []


def interval(values: dict[Key, float]) -> tuple[float, float, float]:
    """(mean, low, high) of per-prompt scores."""
    n = len(values)
    total = sum(values.values())
    low, high = wilson(total, n)
    return total / n, low, high


@dataclass
class Paired:
    n: int  # prompts both runs answered
    leader_mean: float
    other_mean: float
    leader_only: int  # prompts the leader scored higher on
    other_only: int  # prompts the other run scored higher on
    p_value: float

    @property
    def within_noise(self) -> bool:
        return self.p_value >= ALPHA


def paired(leader: dict[Key, float], other: dict[Key, float]) -> Paired | None:
    """Leader vs other on the prompts both answered; None when they share none."""
    shared = [key for key in leader if key in other]
    if not shared:
        return None
    wins = sum(1 for key in shared if leader[key] > other[key])
    losses = sum(1 for key in shared if leader[key] < other[key])
    return Paired(
        n=len(shared),
        leader_mean=sum(leader[k] for k in shared) / len(shared),
        other_mean=sum(other[k] for k in shared) / len(shared),
        leader_only=wins,
        other_only=losses,
        p_value=sign_test(wins, losses),
    )
