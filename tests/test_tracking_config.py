"""`tracking:` and evaluation keys → SFTConfig and tracker names, and the run ids they keep."""

from __future__ import annotations

import os

import pytest
import yaml

from launcher.grid import plan
from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from training.arguments import Adjustments, build_sft_config
from training.tracking import tracked_run_name, wandb_run_id


def run_config(tmp_path, **sections) -> RunConfig:
    return RunConfig.model_validate(
        {"name": "args", "run_id": "0123456789", "run_dir": str(tmp_path / "args" / "0123456789"), **sections}
    )


def sft_config(run: RunConfig, tmp_path):
    return build_sft_config(run, str(tmp_path / "checkpoints"), cuda=False, adjustments=Adjustments())


def test_no_tracker_unless_asked(tmp_path):
    assert sft_config(run_config(tmp_path), tmp_path).report_to == []


def test_wandb_and_mlflow_go_to_transformers_and_tensorboard_to_qlaunchs_own_callback(tmp_path):
    run = run_config(
        tmp_path,
        tracking={"report_to": ["tensorboard", "wandb", "mlflow"]},
        overrides={"train.learning_rate": 0.0002, "lora.r": 8},
    )
    config = sft_config(run, tmp_path)
    assert config.report_to == ["wandb", "mlflow"]
    assert config.run_name == "0123456789-learning_rate=0.0002-r=8" == tracked_run_name(run)
    assert wandb_run_id(run) == "args-0123456789"


def test_report_to_names_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="report_to"):
        run_config(tmp_path, tracking={"report_to": ["tensorbord"]})
    with pytest.raises(ConfigError, match="train.sft_args.report_to: .*tracking.report_to"):
        sft_config(run_config(tmp_path, train={"sft_args": {"report_to": "wandb"}}), tmp_path)


def test_eval_keys_by_their_training_arguments_names(tmp_path):
    run = run_config(
        tmp_path,
        dataset={"test_size": 0.1},
        train={
            "eval_strategy": "steps",
            "eval_steps": 50,
            "save_steps": 100,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
        },
    )
    config = sft_config(run, tmp_path)
    assert (config.eval_strategy, config.eval_steps, config.load_best_model_at_end, config.metric_for_best_model) == (
        "steps",
        50,
        True,
        "eval_loss",
    )


def test_eval_without_a_held_out_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dataset.test_size"):
        run_config(tmp_path, train={"eval_strategy": "steps"})


def test_a_bare_yaml_no_is_the_no_strategy(tmp_path):
    run = run_config(tmp_path, train=yaml.safe_load("eval_strategy: no"))
    assert run.train.eval_strategy == "no"


def test_new_train_keys_at_their_defaults_keep_existing_run_ids(tmp_path):
    path = tmp_path / "exp.yaml"
    grid = "grid:\n  train.learning_rate: [1.0e-4, 2.0e-4]\n"
    # The ids of this grid without the eval keys and tracking: (their checkpoints resume).
    path.write_text("name: ids\n" + grid)
    before = [run.run_id for run in plan(path).runs]
    assert before == ["2bb5cbb06b", "1b3789eb2c"]
    path.write_text(
        "name: ids\ntrain: {eval_strategy: 'no', load_best_model_at_end: false}\n"
        "tracking: {report_to: [wandb]}\n" + grid
    )
    assert [run.run_id for run in plan(path).runs] == before
    path.write_text("name: ids\ntrain: {eval_strategy: steps, eval_steps: 10}\ndataset: {test_size: 0.1}\n" + grid)
    evaluated = [run.run_id for run in plan(path).runs]
    path.write_text("name: ids\ntrain: {eval_strategy: steps}\ndataset: {test_size: 0.1}\n" + grid)
    assert set(evaluated).isdisjoint(run.run_id for run in plan(path).runs)  # a changed eval key is a new run


def test_qlaunch_tensorboard_prints_the_command_over_the_grid(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "my exp.yaml"
    path.write_text("name: tb\nstorage: {root: runs here}\ntracking: {report_to: [tensorboard]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "tensorboard", str(path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"tensorboard --logdir '{tmp_path / 'runs here' / 'tb' / 'tensorboard'}'"


def test_mlflow_default_file_store_finds_a_grid_runs_run_again(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from training.tracking import prepare

    for key in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_TAGS",
        "MLFLOW_RUN_ID",
        "MLFLOW_ALLOW_FILE_STORE",
    ):
        monkeypatch.setenv(key, "")  # remembered, so whatever prepare() sets is undone after the test
        monkeypatch.delenv(key)
    run = run_config(tmp_path, tracking={"report_to": ["mlflow"]}, overrides={"train.learning_rate": 0.0002})
    prepare(run, resumed_from=None, is_main=True)
    first = os.environ["MLFLOW_RUN_ID"]
    prepare(run, resumed_from=4, is_main=True)  # the next attempt
    assert os.environ["MLFLOW_RUN_ID"] == first
    uri = os.environ["MLFLOW_TRACKING_URI"]
    assert uri == (tmp_path / "args" / "mlflow").as_uri()
    client = MlflowClient(tracking_uri=uri)
    [found] = client.search_runs([client.get_experiment_by_name("args").experiment_id])
    assert (found.info.run_id, found.info.run_name) == (first, "0123456789-learning_rate=0.0002")
