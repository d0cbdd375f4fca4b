"""How sure `qlaunch report` may be of its ranking: each run's intervals, the paired comparison
of the top two runs, the verdict sentence, and whether the top run earns its ★.

The statistics are launcher.report_stats (pure math); this module turns them into the report's
fields (json_output.MetricInterval, Comparison, ReportDocument.verdict) and words. README: "How
sure is the winner?".
"""

from __future__ import annotations

from typing import Any

from . import report_stats as stats
from .json_output import Comparison, MetricInterval, ReportDocument, ReportRun


def intervals(summary: dict, scores: stats.Scores | None) -> list[MetricInterval]:
    """Every configured metric: per-example scores where results.jsonl is readable, else the
    summary's means and n (the inference job's infer_end event: Kubernetes without the claim)."""
    found: dict[str, MetricInterval] = {}
    for name, per_who in scores.by_metric.items() if scores else ():
        fields: dict[str, Any] = {"name": name, "n": max(len(v) for v in per_who.values())}
        for who, values in per_who.items():
            mean, low, high = stats.interval(values)
            fields.update({who: round(mean, 4), f"{who}_low": round(low, 4), f"{who}_high": round(high, 4)})
        found[name] = MetricInterval(**fields)
    for metric in summary.get("metrics") or ([summary["metric"]] if isinstance(summary.get("metric"), dict) else []):
        if not isinstance(metric, dict) or "name" not in metric or metric["name"] in found or not metric.get("n"):
            continue
        fields = {"name": metric["name"], "n": int(metric["n"])}
        for who in ("base", "tuned"):
            if isinstance(metric.get(who), (int, float)):
                low, high = stats.wilson(metric[who] * metric["n"], int(metric["n"]))
                fields.update({who: metric[who], f"{who}_low": round(low, 4), f"{who}_high": round(high, 4)})
        found[metric["name"]] = MetricInterval(**fields)
    return list(found.values())


def comparison(runs: list[ReportRun] | bool, scores: dict[str, stats.Scores | None]) -> Comparison | None:
    """The leader against the runner-up on the ranking metric, paired per example."""
    if not runs or len(runs) < 2 or runs[1].metric is None or runs[1].metric.tuned is None:
        return None
    leader, other = runs[0], runs[1]
    name = leader.metric.name
    mine = (scores.get(leader.run_id) or stats.Scores({})).by_metric.get(name, {}).get("tuned")
    theirs = (scores.get(other.run_id) or stats.Scores({})).by_metric.get(name, {}).get("tuned")
    result = stats.paired(mine, theirs) if mine and theirs else None
    if result is None:
        return None
    return Comparison(
        metric=name,
        leader=leader.run_id,
        runner_up=other.run_id,
        n=result.n,
        leader_score=round(result.leader_mean, 4),
        runner_up_score=round(result.other_mean, 4),
        leader_only=result.leader_only,
        runner_up_only=result.other_only,
        p_value=round(result.p_value, 4),
        within_noise=result.within_noise,
        statement=_paired_sentence(leader.run_id, other.run_id, name, result),
    )


def _paired_sentence(leader: str, other: str, name: str, result: stats.Paired) -> str:
    differ = result.leader_only + result.other_only
    if differ == 0:
        return (
            f"No clear winner on {name}: {leader} and {other} score the same on every one of the {result.n} "
            f"held-out examples both answered ({result.leader_mean:.2f}); {leader} is ranked first only for "
            "its lower final training loss."
        )
    split = (
        f"of the {result.n} held-out examples both answered they score differently on {differ} "
        f"({result.leader_only} for {leader}, {result.other_only} for {other})"
    )
    if result.within_noise:
        return (
            f"No clear winner on {name}: {leader} ({result.leader_mean:.2f}) leads {other} "
            f"({result.other_mean:.2f}), but {split}; a split at least this uneven happens by chance "
            f"with p = {result.p_value:.2f} (McNemar's exact test), so the lead is within sampling noise. "
            f"More held-out examples (inference.eval_file) would tell them apart."
        )
    return (
        f"{leader} is best on {name}: {result.leader_mean:.2f} vs {result.other_mean:.2f} for the runner-up "
        f"{other}; {split}, {_p(result.p_value)} (McNemar's exact test)."
    )


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def lead_within_noise(document: ReportDocument) -> bool:
    """Is the top run's lead not established? The paired test where there is one; else whether
    the two tuned intervals overlap (a conservative stand-in without per-example scores)."""
    if document.comparison is not None:
        return document.comparison.within_noise
    ranked = [r for r in document.runs if r.metric is not None and r.metric.tuned is not None]
    if len(ranked) < 2:
        return False
    first, second = (headline_interval(r) for r in ranked[:2])
    return bool(
        first
        and second
        and first.tuned_low is not None
        and second.tuned_high is not None
        and first.tuned_low <= second.tuned_high
    )


def crowned(document: ReportDocument) -> bool:
    """Does the top run earn its ★? Only on an inference metric, by a lead the numbers support
    (a final training loss is one batch's loss: it ranks, it does not crown)."""
    return document.ranked_by != "final_loss" and not lead_within_noise(document)


def top_label(document: ReportDocument) -> str:
    if crowned(document):
        return "best run"
    return "lowest final loss" if document.ranked_by == "final_loss" else "top run (lead within noise)"


def headline_interval(run: ReportRun) -> MetricInterval | None:
    return next((i for i in run.intervals if run.metric and i.name == run.metric.name), None)


def verdict(runs: list[ReportRun], comparison: Comparison | None, by_metric: bool) -> str:
    if not runs or not any(r.attempts or r.final_loss is not None for r in runs):
        return ""
    if not by_metric:
        return (
            "No inference metrics yet: runs are ranked by final training loss, which says little "
            "about the answers (inference.eval_file scores them)."
        )
    scored = [r for r in runs if r.metric is not None and r.metric.tuned is not None]
    leader = scored[0]
    name = leader.metric.name
    if len(scored) < 2:
        return f"Only {leader.run_id} has {name} scores: nothing to compare it with."
    other = scored[1]
    if comparison is not None:
        parts = [comparison.statement]
    else:
        first, second = headline_interval(leader), headline_interval(other)
        parts = [
            f"{leader.run_id} leads on {name} ({leader.metric.tuned:.2f} vs {other.metric.tuned:.2f} for "
            f"{other.run_id}); the per-example answers are not readable here, so there is no paired test."
        ]
        if first and second and first.tuned_low is not None and second.tuned_high is not None:
            overlap = first.tuned_low <= second.tuned_high
            parts.append(
                f"Their 95% intervals ({_span(first)} and {_span(second)}) "
                + ("overlap: the lead may be sampling noise." if overlap else "do not overlap.")
            )
    parts += _loss_disagrees(leader, other)
    parts += _other_metrics(scored, leader)
    return " ".join(parts)


def _span(interval: MetricInterval) -> str:
    return f"{interval.tuned_low:.2f}–{interval.tuned_high:.2f}"


def _loss_disagrees(leader: ReportRun, other: ReportRun) -> list[str]:
    if leader.eval_loss is not None and other.eval_loss is not None:
        if leader.eval_loss > other.eval_loss:
            return [
                f"{leader.run_id} also has the higher eval loss ({leader.eval_loss:.4f} vs {other.eval_loss:.4f}): "
                "the loss and the metric disagree."
            ]
        return []
    if leader.final_loss is not None and other.final_loss is not None and leader.final_loss > other.final_loss:
        return [
            f"{leader.run_id} has the higher final training loss ({leader.final_loss:.4f} vs "
            f"{other.final_loss:.4f}; no eval loss: dataset.test_size measures one)."
        ]
    return []


def _other_metrics(scored: list[ReportRun], leader: ReportRun) -> list[str]:
    """Other configured metrics on which another run scores higher than the leader."""
    said = []
    for entry in leader.metrics[1:]:
        if entry.tuned is None:
            continue
        rival = max(scored, key=lambda r: next((m.tuned or 0.0 for m in r.metrics if m.name == entry.name), 0.0))
        value = next((m.tuned for m in rival.metrics if m.name == entry.name), None)
        if rival is not leader and value is not None and value > entry.tuned:
            said.append(f"On {entry.name} {rival.run_id} scores higher ({value:.2f} vs {entry.tuned:.2f}).")
    return said
