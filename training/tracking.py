"""Experiment trackers (`tracking.report_to`): one tracked run per grid run, across attempts.

A preempted job starts again from its newest checkpoint. Each tracker is told so, so that the
grid run keeps one curve instead of one per attempt:
- TensorBoard: `<experiment folder>/tensorboard/<run id>-<grid values>/`; a resumed attempt
  opens its writer with `purge_step`, so steps a killed attempt logged after its last checkpoint
  are dropped by TensorBoard's reader instead of appearing twice.
- W&B: the run id is derived from the stable run id and `WANDB_RESUME=allow`, so every attempt
  continues the same W&B run; offline run folders go to `<experiment folder>/wandb/`.
- MLflow: the run is found again by the tag `qlaunch.run_id` and handed to transformers'
  MLflowCallback through `MLFLOW_RUN_ID`.
Secrets (WANDB_API_KEY, MLflow credentials) are read by the trackers from the job's environment;
nothing here writes or logs them.

The trackers' packages are optional (`pip install qlaunch[tracking]`) and imported only when asked for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from launcher.job.config import RunConfig
from launcher.job.storage import tensorboard_root

# The tag an MLflow run of a grid run carries: how a resumed attempt finds its run again.
MLFLOW_RUN_TAG = "qlaunch.run_id"


def varying_values(run: RunConfig) -> str:
    """`learning_rate=0.0002-r=8`: the grid values of this run, by their last key part."""
    leaves = [key.rsplit(".", 1)[-1] for key in run.overrides]
    names = leaves if len(set(leaves)) == len(leaves) else list(run.overrides)  # ambiguous: dotted
    parts = [f"{name}={_short(value)}" for name, value in zip(names, run.overrides.values())]
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", "-".join(parts))


def tracked_run_name(run: RunConfig) -> str:
    """The name a run has in every tracker: its id plus the grid values that vary."""
    values = varying_values(run)
    return f"{run.run_id}-{values}" if values else run.run_id


def experiment_folder(run: RunConfig) -> Path:
    return Path(run.run_dir).parent


def tensorboard_dir(run: RunConfig) -> Path:
    return tensorboard_root(experiment_folder(run)) / tracked_run_name(run)


def wandb_run_id(run: RunConfig) -> str:
    # W&B run ids allow letters, digits, '-' and '_'; the experiment name keeps ids of two
    # experiments that train the same config apart inside one project.
    return f"{run.name}-{run.run_id}"


def mlflow_uri(run: RunConfig) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or run.tracking.mlflow_uri
        or (experiment_folder(run) / "mlflow").resolve().as_uri()
    )


def prepare(run: RunConfig, *, resumed_from: int | None, is_main: bool) -> list:
    """Set the trackers' environment (before the Trainer starts them); the callbacks to add."""
    wanted = run.tracking.report_to
    callbacks: list = []
    if "tensorboard" in wanted:
        callbacks.append(resuming_tensorboard_callback(tensorboard_dir(run), resumed_from))
    if "wandb" in wanted:
        _wandb_environment(run)
        callbacks.append(wandb_run_config_callback(run))
    if "mlflow" in wanted:
        _mlflow_environment(run, is_main=is_main)
    return callbacks


def _wandb_environment(run: RunConfig) -> None:
    folder = experiment_folder(run)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_PROJECT"] = run.tracking.project or run.name
    os.environ["WANDB_RUN_GROUP"] = run.name
    os.environ["WANDB_RUN_ID"] = wandb_run_id(run)
    os.environ["WANDB_RESUME"] = "allow"
    os.environ["WANDB_DIR"] = str(folder)  # run folders in <experiment>/wandb/
    if run.tracking.tags:
        os.environ["WANDB_TAGS"] = ",".join(run.tracking.tags)
    if run.tracking.wandb_entity:
        os.environ["WANDB_ENTITY"] = run.tracking.wandb_entity
    if run.tracking.wandb_mode and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = run.tracking.wandb_mode


def _mlflow_environment(run: RunConfig, *, is_main: bool) -> None:
    uri = mlflow_uri(run)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked; it is the one store that needs no
        # server or database and takes concurrent runs of a grid on shared storage.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = run.name
    os.environ["MLFLOW_TAGS"] = json.dumps({MLFLOW_RUN_TAG: run.run_id, **{tag: "true" for tag in run.tracking.tags}})
    if is_main:  # only rank 0 logs (transformers' callback checks it too)
        os.environ["MLFLOW_RUN_ID"] = mlflow_run_for(run, uri)


def mlflow_run_for(run: RunConfig, uri: str) -> str:
    """The MLflow run of this grid run: found by its tag, created on the first attempt."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(run.name)
    if experiment is None:
        try:
            client.create_experiment(run.name)
        except Exception:  # noqa: BLE001 - another run of the grid created it first
            pass
        experiment = client.get_experiment_by_name(run.name)
    experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{run.run_id}'")
    if found:
        return found[0].info.run_id
    tags = {MLFLOW_RUN_TAG: run.run_id, **{f"grid.{k}": str(v) for k, v in run.overrides.items()}}
    created = client.create_run(experiment_id, tags=tags, run_name=tracked_run_name(run))
    return created.info.run_id


def resuming_tensorboard_callback(log_dir: Path, resumed_from: int | None):
    from transformers.integrations import TensorBoardCallback

    class ResumingTensorBoardCallback(TensorBoardCallback):
        """transformers' TensorBoard callback in a fixed folder per run, purging replayed steps."""

        def __init__(self) -> None:
            super().__init__()
            self.logging_dir = str(log_dir)

        purge_step = None if resumed_from is None else resumed_from + 1

        def _init_summary_writer(self, args):
            # A resumed attempt logs from resumed_from + 1 again: events at those steps or later
            # (from an attempt killed after its last checkpoint) are hidden by the reader. Only
            # the first writer purges: one reopened after training (a final evaluate) must not.
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)
            self.purge_step = None

    return ResumingTensorBoardCallback()


def record_pruned(run: RunConfig, pruned: dict[str, Any], step: int) -> None:
    """Close the run's tracked run as asha stopped it: its state and rung where each tracker
    keeps such things (TensorBoard: scalar + text; MLflow: tags + metric; W&B: the summary), so
    a dashboard of the grid tells a stopped run from one that finished. Rank 0 only, after
    training (the trainer's own callbacks have written their last step)."""
    from launcher.job.search import pruned_text

    wanted, text = run.tracking.report_to, pruned_text(pruned)
    if "tensorboard" in wanted:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard_dir(run)))
        writer.add_scalar("qlaunch/pruned_rung", pruned.get("rung", 0), step)
        writer.add_text("qlaunch/state", text, step)
        writer.close()
    if "mlflow" in wanted:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(run)
        client, mlflow_run = MlflowClient(tracking_uri=uri), mlflow_run_for(run, uri)  # found by its tag
        client.set_tag(mlflow_run, "qlaunch.state", "pruned")
        client.set_tag(mlflow_run, "qlaunch.pruned", text)
        client.log_metric(mlflow_run, "qlaunch_pruned_rung", float(pruned.get("rung", 0)), step=step)
    if "wandb" in wanted:
        import wandb

        if wandb.run is not None:
            wandb.run.summary.update(
                {"qlaunch/state": "pruned", "qlaunch/pruned": text, "qlaunch/pruned_rung": pruned.get("rung", 0)}
            )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def wandb_run_config_callback(run: RunConfig):
    from transformers import TrainerCallback

    config = {
        "qlaunch": run.model_dump(mode="json", exclude={"run_dir", "experiment_dir"}),
        "grid": dict(run.overrides),
        "run_id": run.run_id,
    }

    class WandbRunConfig(TrainerCallback):
        """Adds the whole run config (with its grid values) to the W&B run transformers opened."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            import wandb

            if wandb.run is not None:
                wandb.run.config.update(config, allow_val_change=True)

    return WandbRunConfig()


def benchmark_metrics(lm_eval: dict[str, Any]) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` (the adapter's) and `.../<metric>_base` from summary.json's
    lm_eval field: every metric each task reported."""
    flat: dict[str, float] = {}
    for task, row in (lm_eval.get("tasks") or {}).items():
        for who, metrics in (row.get("metrics") or {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    flat[f"lm_eval/{task}/{name}{'' if who == 'tuned' else '_' + who}"] = float(value)
    return flat


def record_benchmarks(run: RunConfig, lm_eval: dict[str, Any], step: int) -> None:
    """The grid evaluation's lm-eval scores into the run's tracked run, where the training's
    metrics are (TensorBoard scalars at the final step, MLflow metrics on the run found by its
    tag, the W&B run resumed by its id: its summary)."""
    wanted, metrics = run.tracking.report_to, benchmark_metrics(lm_eval)
    if not wanted or not metrics:
        return
    if "tensorboard" in wanted:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard_dir(run)))
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
        writer.close()
    if "mlflow" in wanted:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(run)
        if uri.startswith("file:"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        client, mlflow_run = MlflowClient(tracking_uri=uri), mlflow_run_for(run, uri)
        for name, value in metrics.items():
            client.log_metric(mlflow_run, name, value, step=step)
    if "wandb" in wanted:
        import wandb

        _wandb_environment(run)
        tracked = wandb.init(id=wandb_run_id(run), resume="allow", name=tracked_run_name(run))
        tracked.summary.update(metrics)
        tracked.finish()
