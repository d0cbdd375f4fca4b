"""The documents `qlaunch plan|status|report --json` print: one JSON object each, for scripts and jq.

The shape is these models (README: "Machine-readable output"). It is stable: a field is never
renamed or removed within a `version`; new fields may be added. Each document says what it is in
`kind` and `version`. tests/snapshots/json/*.schema.json hold the JSON Schema of each, so a change
of shape shows up in review.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

VERSION = 1


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metric(_Shape):
    """An inference metric over the held-out examples: mean score of the base model and of the
    fine-tuned one (0..1, higher is better)."""

    name: str
    base: float | None = None
    tuned: float | None = None
    n: int | None = None


class Benchmark(_Shape):
    """An lm-evaluation-harness task of inference.lm_eval (summary.json's `lm_eval`): its headline
    metric (acc where the task reports it) for the base model and the fine-tuned one."""

    task: str
    metric: str | None = None
    base: float | None = None
    tuned: float | None = None
    n: int | None = None  # examples scored (after inference.lm_eval.limit)


class HubPush(_Shape):
    repo_id: str
    private: bool
    revision: str  # the pushed commit
    url: str


class Export(_Shape):
    """One `qlaunch export` of the run (`<run dir>/exports.json`)."""

    path: str  # the export folder
    kind: Literal["adapter", "merged"] | None
    at: float  # unix seconds
    merge_base: str | None = None  # the merge that shipped: dequantized-4bit | float16
    gguf: str | None = None  # the GGUF file in the folder
    hub: HubPush | None = None


# ---- qlaunch plan --json ---------------------------------------------------------------------
class PlanRun(_Shape):
    run_id: str
    overrides: dict[str, Any]  # the grid values of this run, by dotted key
    run_dir: str


class PlanDocument(_Shape):
    kind: Literal["qlaunch.plan"] = "qlaunch.plan"
    version: int = VERSION
    experiment: str
    source: str  # the experiment file
    backend: str  # the experiment file's default backend
    storage_root: str
    varying_keys: list[str]
    runs: list[PlanRun]


# ---- qlaunch status --json -------------------------------------------------------------------
State = Literal[
    "unknown", "pending", "running", "requeued", "completed", "failed", "cancelled", "timeout", "out_of_memory"
]


class StatusRun(_Shape):
    run_id: str
    overrides: dict[str, Any]
    state: State  # the training job
    detail: str  # scheduler reason, exit code ("" when none)
    infer_state: State  # the inference job
    infer_detail: str = ""  # e.g. "waiting for training"
    job_ids: list[str]
    step: int
    total_steps: int | None
    loss: float | None  # last logged training loss
    tokens_per_second: float | None
    elapsed_seconds: float | None  # first start → last event
    eta_seconds: float | None  # only while running
    restarts: int
    metric: Metric | None  # headline metric, once inference has run
    # search.strategy asha: the decision that stopped the run (rung, value, rank, competitors...)
    pruned: dict[str, Any] | None = None
    exports: list[Export] = []  # `qlaunch export`s of the run, oldest first


class StatusDocument(_Shape):
    kind: Literal["qlaunch.status"] = "qlaunch.status"
    version: int = VERSION
    experiment: str
    backend: str
    time: float  # unix seconds of the snapshot
    varying_keys: list[str]
    runs: list[StatusRun]


# ---- qlaunch report --json -------------------------------------------------------------------
Outcome = Literal["completed", "preempted", "killed", "failed", "running"]


class AttemptRecord(_Shape):
    """One start of the training job (launcher.job.ledger)."""

    number: int
    launched_at: float | None
    started_at: float | None
    ended_at: float | None
    resumed_from: int | None  # checkpoint step (None: from scratch)
    stop_step: int
    outcome: Outcome
    signal: str | None
    message: str | None
    steps_redone: int  # steps the next attempt trained again
    lost_seconds: float  # redone steps' wall time + the next attempt's start-up
    seconds: float  # launch → end


class Answer(_Shape):
    kind: Literal["prompt", "eval"]
    prompt: str
    reference: str | None = None
    base: str | None = None
    tuned: str | None = None
    base_score: float | None = None
    tuned_score: float | None = None


class Environment(_Shape):
    source: str  # file it was read from, relative to the run folder
    data: dict[str, Any]


class MetricInterval(_Shape):
    """A metric's mean over the held-out examples with its 95% Wilson score interval (from the
    per-example scores of inference/results.jsonl; launcher.report_stats)."""

    name: str
    n: int
    base: float | None = None
    base_low: float | None = None
    base_high: float | None = None
    tuned: float | None = None
    tuned_low: float | None = None
    tuned_high: float | None = None


class Comparison(_Shape):
    """The top-ranked run against the runner-up on the ranking metric, paired on the held-out
    examples both answered: the exact sign test (McNemar's exact test for 0/1 scores)."""

    metric: str
    leader: str  # run id ranked first
    runner_up: str  # run id ranked second
    n: int  # examples both runs answered
    leader_score: float  # mean over those n
    runner_up_score: float
    leader_only: int  # examples the leader scored higher on
    runner_up_only: int  # examples the runner-up scored higher on
    p_value: float  # two-sided; the lead is within noise when p >= 0.05
    within_noise: bool
    statement: str  # the plain sentence report.md/.html print


class ReportRun(_Shape):
    rank: int  # 1 = best by the document's ranked_by
    best: bool
    run_id: str
    overrides: dict[str, Any]
    state: State
    infer_state: State
    step: int
    total_steps: int | None
    final_loss: float | None
    best_loss: float | None
    eval_loss: float | None
    metric: Metric | None  # headline (the first of inference.metric)
    metrics: list[Metric]
    tokens_per_second: float | None  # mean over logged steps
    wall_seconds: float  # all attempts, launch → end
    gpus: int  # nodes × gpus_per_node (0: CPU)
    gpu_hours: float
    restarts: int
    steps_redone: int
    lost_seconds: float
    lost_gpu_hours: float
    attempts: list[AttemptRecord]
    loss_curve: list[tuple[int, float]]  # (step, training loss), the steps that were kept
    eval_curve: list[tuple[int, float]]  # (step, eval loss)
    environment: list[Environment]
    answers: list[Answer]  # the first few of inference/results.jsonl
    intervals: list[MetricInterval] = []  # every configured metric, where results.jsonl is readable
    exports: list[Export] = []  # `qlaunch export`s of the run, oldest first
    benchmarks: list[Benchmark] = []  # inference.lm_eval's tasks, base → tuned
    # search.strategy asha: the decision that stopped the run (as in status --json)
    pruned: dict[str, Any] | None = None


class SearchRung(_Shape):
    rung: int
    at: int | None  # the rung's size, in `unit`
    unit: str | None  # "steps" | "tokens"
    results: dict[str, float]  # run id → metric recorded at this rung
    continued: list[str]  # run ids promoted past it
    stopped: list[str]  # run ids pruned here


class SearchAudit(_Shape):
    """`report --audit`: the stopped runs finished to their budget; would the winner change?"""

    metric: str
    mode: str
    winner: str  # by the metric, among the runs the search let finish
    winner_value: float
    plain_winner: str  # among every run, the stopped ones finished
    plain_winner_value: float
    finished: dict[str, float]  # stopped run id → its metric, finished
    regret: float  # how much better the plain grid's winner is (0: the same winner)


class SearchSummary(_Shape):
    """search.strategy asha: the rungs, who went on, and the GPU time it saved."""

    strategy: str
    metric: str
    mode: str
    reduction_factor: int
    rungs: list[SearchRung]
    pruned: list[str]
    trained_steps: int  # over all runs
    full_steps: int  # what every run to its end would have trained
    gpu_hours: float  # spent (measured)
    full_gpu_hours: float  # estimate: each run's measured rate × its full budget
    saved_gpu_hours: float
    saved_fraction: float  # 1 - trained_steps / full_steps
    audit: SearchAudit | None = None  # `report --audit`


class ReportDocument(_Shape):
    kind: Literal["qlaunch.report"] = "qlaunch.report"
    version: int = VERSION
    experiment: str
    backend: str
    generated_at: float
    ranked_by: str  # "<metric> (tuned)" or "final_loss"
    best_run: str | None  # the top of the ranking (see comparison for whether its lead is real)
    varying_keys: list[str]
    notes: list[str]  # what the report could not read, and why
    verdict: str = ""  # the plain-language summary: winner, or a lead within noise, and loss
    comparison: Comparison | None = None  # None: fewer than two runs with per-example scores
    files: dict[str, str]  # report.html, report.md, report.json, PNGs → path
    runs: list[ReportRun]
    search: SearchSummary | None = None  # search.strategy asha only


def plan_document(plan, backend: str) -> dict:
    """`qlaunch plan --json` of a launcher.grid.Plan."""
    return PlanDocument(
        experiment=plan.experiment.name,
        source=str(plan.source),
        backend=backend,
        storage_root=str(plan.storage_root),
        varying_keys=plan.varying_keys,
        runs=[PlanRun(run_id=r.run_id, overrides=r.overrides, run_dir=r.run_dir) for r in plan.runs],
    ).model_dump(mode="json")


DOCUMENTS = {"plan": PlanDocument, "status": StatusDocument, "report": ReportDocument}
