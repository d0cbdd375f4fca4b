"""Mistakes that used to pass every check and fail in the queued job (issue #33, finding 8):
`train.sft_args` typos, a grid over a key outside the run id, unknown keys without a
suggestion, values only trl/transformers range-check. Each is refused by the real
`qlaunch check/plan/render` with one `file:line: key: message` line."""

from __future__ import annotations

import typing
from importlib.metadata import version
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.job.config import QuantizationConfig

# The versions the shipped names come from are the installed ones (the staleness test below).
TRL, TRANSFORMERS = version("trl"), version("transformers")

HEAD = "name: demo\ninference:\n  enabled: false\n"  # lines 1-3; no paths to check


@pytest.fixture(autouse=True)
def qlaunch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "qlaunch-home"))


def refused(tmp_path: Path, capsys, body: str, commands=("check", "plan", "render")) -> list[str]:
    """The error lines every command prints for this experiment (the same for each), exit 2."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(HEAD + body)
    outputs = []
    for command in commands:
        args = [command, str(exp)] + (["-o", str(tmp_path / "rendered")] if command == "render" else [])
        assert main(args) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err
        outputs.append([line.removeprefix("error: ").replace(str(exp), "exp.yaml") for line in err.splitlines()])
    assert all(output == outputs[0] for output in outputs), outputs
    assert not (tmp_path / "rendered").exists()
    return outputs[0]


# --- (a) train.sft_args against SFTConfig's fields --------------------------------------------------


def test_an_sft_args_typo_is_refused_at_plan_time_with_a_suggestion(tmp_path, capsys):
    body = "train:\n  max_steps: 10\n  sft_args:\n    neftune_noise_alpa: 5\n"
    assert refused(tmp_path, capsys, body) == [
        f"exp.yaml:7: train.sft_args.neftune_noise_alpa: unknown SFTConfig argument (trl {TRL}), "
        "did you mean 'neftune_noise_alpha'?"
    ]


def test_sft_args_problems_are_all_named_at_once(tmp_path, capsys):
    body = (
        "train:\n  sft_args:\n    max_seq_length: 512\n    output_dir: /elsewhere\n"
        "    zzz_not_anything: 1\n    neftune_noise_alpha: 5\n"
    )
    assert refused(tmp_path, capsys, body, commands=("plan",)) == [
        f"exp.yaml:6: train.sft_args.max_seq_length: unknown SFTConfig argument (trl {TRL}), did you mean "
        "train.max_seq_length?",
        "exp.yaml:7: train.sft_args.output_dir: set by qlaunch (checkpoints always go to <run dir>/checkpoints)",
        f"exp.yaml:8: train.sft_args.zzz_not_anything: unknown SFTConfig argument (trl {TRL})",
    ]


def test_known_sft_args_pass(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        HEAD + "train:\n  sft_args:\n    neftune_noise_alpha: 5\n    warmup_steps: 10\n"
        "    lr_scheduler_kwargs: {min_lr: 1.0e-6}\n"
    )
    assert main(["check", str(exp)]) == 0, capsys.readouterr().err


# --- (b) a grid over a key that is not in the run id ------------------------------------------------


def test_a_grid_over_resources_says_resources_are_not_in_the_run_id(tmp_path, capsys):
    body = "grid:\n  lora.r: [8, 16]\n  resources.memory: [32G, 48G]\n"
    (line,) = refused(tmp_path, capsys, body)
    assert line == (
        "exp.yaml:6: grid.resources.memory: resources is not part of the run id (only model, dataset, prompt, "
        "quantization, lora, train are), so these 2 values would all be the same run, in the same folder; "
        "to compare them, use one experiment file per value, each with its own name"
    )
    assert "duplicate" not in line


def test_a_real_duplicate_grid_value_is_still_called_one(tmp_path, capsys):
    (line,) = refused(tmp_path, capsys, "grid:\n  lora.r: [16, 16]\n", commands=("plan",))
    assert "remove the duplicate value" in line


# --- (c) did you mean, for unknown keys everywhere ---------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ("train:\n  lerning_rate: 0.1\n", "exp.yaml:5: train.lerning_rate: unknown key, did you mean 'learning_rate'?"),
        ("modle:\n  name_or_path: x\n", "exp.yaml:4: modle: unknown key, did you mean 'model'?"),
        (
            "kubernetes:\n  tolerations:\n    - key: a\n      efect: NoSchedule\n",
            "exp.yaml:7: kubernetes.tolerations.0.efect: unknown key, did you mean 'effect'?",
        ),
        (
            "kubernetes:\n  hf_token_secret: {name: t, kye: token}\n",
            "exp.yaml:5: kubernetes.hf_token_secret.kye: unknown key, did you mean 'key'?",
        ),
        ("train:\n  zzzz: 1\n", "exp.yaml:5: train.zzzz: unknown key"),
    ],
)
def test_unknown_keys_get_the_closest_known_key(tmp_path, capsys, body, expected):
    assert refused(tmp_path, capsys, body) == [expected]


def test_an_unknown_grid_key_gets_the_closest_known_key(tmp_path, capsys):
    (line,) = refused(tmp_path, capsys, "grid:\n  train.lerning_rate: [0.1, 0.2]\n", commands=("plan",))
    assert line.startswith(
        "exp.yaml:5: grid.train.lerning_rate: unknown key 'lerning_rate' under train, "
        "did you mean 'learning_rate'? (known: "
    )


# --- (d) values only the libraries check ----------------------------------------------------------

LIBRARY_ONLY = {
    "optimizer typo": (
        "train:\n  optim: paged_adamw_32bt\n",
        f"exp.yaml:5: train.optim: 'paged_adamw_32bt' is not an optimizer of transformers {TRANSFORMERS}, "
        "did you mean 'paged_adamw_32bit'?",
    ),
    "optimizer typo in sft_args": (
        "train:\n  sft_args:\n    optim: adamw_trch\n",
        f"exp.yaml:6: train.sft_args.optim: 'adamw_trch' is not an optimizer of transformers {TRANSFORMERS}, "
        "did you mean 'adamw_torch'?",
    ),
    "scheduler typo": (
        "train:\n  lr_scheduler_type: cosin\n",
        f"exp.yaml:5: train.lr_scheduler_type: 'cosin' is not a scheduler of transformers {TRANSFORMERS}, "
        "did you mean 'cosine'?",
    ),
    "plateau scheduler without evaluation": (
        "train:\n  lr_scheduler_type: reduce_lr_on_plateau\n",
        "exp.yaml:5: train.lr_scheduler_type: 'reduce_lr_on_plateau' steps on evaluation results: set "
        "train.eval_strategy (and dataset.test_size) or choose another scheduler",
    ),
    "max_steps 0": (
        "train:\n  max_steps: 0\n",
        "exp.yaml:5: train.max_steps: 0: use a positive number of steps, or -1 to train train.num_train_epochs epochs",
    ),
    "best model with epoch evaluation": (
        "dataset:\n  test_size: 0.1\ntrain:\n  eval_strategy: epoch\n  load_best_model_at_end: true\n",
        "exp.yaml:7: train.eval_strategy: 'epoch': load_best_model_at_end needs it to be 'steps' (qlaunch saves "
        "every train.save_steps steps)",
    ),
    "save steps not a multiple of eval steps": (
        "dataset:\n  test_size: 0.1\ntrain:\n  eval_strategy: steps\n  eval_steps: 30\n  save_steps: 100\n"
        "  load_best_model_at_end: true\n",
        "exp.yaml:9: train.save_steps: 100 is not a multiple of train.eval_steps = 30: load_best_model_at_end "
        "needs a checkpoint at every evaluation",
    ),
    "save steps from sft_args not a multiple of logging steps": (
        "dataset:\n  test_size: 0.1\ntrain:\n  eval_strategy: steps\n  logging_steps: 30\n"
        "  load_best_model_at_end: true\n  sft_args:\n    save_steps: 50\n",
        "exp.yaml:11: train.sft_args.save_steps: 50 is not a multiple of train.logging_steps (eval_steps is null) = 30: "
        "load_best_model_at_end needs a checkpoint at every evaluation",
    ),
    "negative warmup steps": (
        "train:\n  sft_args:\n    warmup_steps: -5\n",
        "exp.yaml:6: train.sft_args.warmup_steps: -5: must be 0 or more",
    ),
    "prefetch without workers": (
        "train:\n  sft_args:\n    dataloader_prefetch_factor: 2\n",
        "exp.yaml:6: train.sft_args.dataloader_prefetch_factor: needs train.dataloader_num_workers above 0 "
        "(there are no worker processes to prefetch)",
    ),
    # Ranges pydantic already held (kept here so the catalogue covers what the issue lists).
    "lora dropout 1": ("lora:\n  dropout: 1.0\n", "exp.yaml:5: lora.dropout: Input should be less than 1"),
    "warmup ratio above 1": (
        "train:\n  warmup_ratio: 1.5\n",
        "exp.yaml:5: train.warmup_ratio: Input should be less than or equal to 1",
    ),
    "fp16 and bf16": (
        "train:\n  fp16: true\n  bf16: true\n",
        "exp.yaml:5: train.fp16: train.fp16 and train.bf16 cannot both be true",
    ),
    "negative max_grad_norm": (
        "train:\n  max_grad_norm: -1\n",
        "exp.yaml:5: train.max_grad_norm: Input should be greater than or equal to 0",
    ),
    "gradient accumulation 0": (
        "train:\n  gradient_accumulation_steps: 0\n",
        "exp.yaml:5: train.gradient_accumulation_steps: Input should be greater than or equal to 1",
    ),
    "save_steps 0": (
        "train:\n  save_steps: 0\n",
        "exp.yaml:5: train.save_steps: Input should be greater than or equal to 1",
    ),
    "quant type": (
        "quantization:\n  bnb_4bit_quant_type: nf5\n",
        "exp.yaml:5: quantization.bnb_4bit_quant_type: Input should be 'nf4' or 'fp4'",
    ),
}


@pytest.mark.parametrize("case", list(LIBRARY_ONLY))
def test_values_only_the_libraries_check_are_refused_at_plan_time(tmp_path, capsys, case):
    body, expected = LIBRARY_ONLY[case]
    assert refused(tmp_path, capsys, body, commands=("check", "plan")) == [expected]


def test_best_model_passes_with_matching_steps_or_save_strategy_best(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    for train in (
        "  eval_strategy: steps\n  eval_steps: 25\n  save_steps: 100\n",
        "  eval_strategy: epoch\n  sft_args: {save_strategy: best}\n",
    ):
        exp.write_text(HEAD + "dataset:\n  test_size: 0.1\ntrain:\n  load_best_model_at_end: true\n" + train)
        assert main(["plan", str(exp)]) == 0, capsys.readouterr().err


def test_a_bad_grid_value_is_named_at_its_own_line(tmp_path, capsys):
    body = "grid:\n  train.optim:\n    - adamw_torch\n    - adamw_trch\n  lora.r: [8, 16]\n"
    assert refused(tmp_path, capsys, body) == [
        f"exp.yaml:7: grid.train.optim[1]: 'adamw_trch' is not an optimizer of transformers {TRANSFORMERS}, "
        "did you mean 'adamw_torch'?"
    ]


# --- the shipped names: current, and covering what config.py's literals allow -----------------------


def test_the_shipped_library_names_are_those_of_the_installed_libraries():
    """Fails after an upgrade of trl/transformers until `make library-names` is run."""
    pytest.importorskip("trl")
    from launcher.job.recipe_checks import NAMES_FILE
    from training.library_names import collect, render

    assert NAMES_FILE.read_text() == render(collect()), (
        "launcher/job/library_names.json is stale: run `make library-names` and commit it"
    )


def test_config_literals_are_names_the_libraries_accept():
    from launcher.job.recipe_checks import library_names

    names = library_names()
    fields = QuantizationConfig.model_fields
    assert set(typing.get_args(fields["bnb_4bit_quant_type"].annotation)) <= set(names["bnb_4bit_quant_types"])
    assert set(typing.get_args(fields["bnb_4bit_compute_dtype"].annotation)) <= set(names["compute_dtypes"])
    defaults = QuantizationConfig()
    assert defaults.bnb_4bit_quant_type in names["bnb_4bit_quant_types"]
    from launcher.job.config import TrainConfig

    assert TrainConfig().optim in names["optimizers"] and TrainConfig().lr_scheduler_type in names["lr_scheduler_types"]


def test_the_shipped_examples_pass_the_recipe_checks(capsys):
    for example in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        assert main(["plan", str(example)]) == 0, (example, capsys.readouterr().err)


def test_a_grid_over_an_unknown_sft_arg_is_named_once_at_the_grid_key(tmp_path, capsys):
    body = "grid:\n  train.sft_args.neftune_noise_alpa: [1, 5]\n"
    assert refused(tmp_path, capsys, body) == [
        f"exp.yaml:5: grid.train.sft_args.neftune_noise_alpa: unknown SFTConfig argument (trl {TRL}), "
        "did you mean 'neftune_noise_alpha'?"
    ]


# What plan refuses, the job's trl would have refused too (no stricter than the libraries, except
# max_steps 0, which trains whole epochs without an error).
JOB_REFUSES = {
    "sft_args typo": {"sft_args": {"neftune_noise_alpa": 5}},
    "optimizer typo": {"optim": "adamw_trch"},
    "scheduler typo": {"lr_scheduler_type": "cosin"},
    "plateau scheduler without evaluation": {"lr_scheduler_type": "reduce_lr_on_plateau"},
    "best model with epoch evaluation": {"eval_strategy": "epoch", "load_best_model_at_end": True},
    "save steps not a multiple": {
        "eval_strategy": "steps",
        "eval_steps": 30,
        "save_steps": 100,
        "load_best_model_at_end": True,
    },
    "negative warmup steps": {"sft_args": {"warmup_steps": -5}},
    "prefetch without workers": {"sft_args": {"dataloader_prefetch_factor": 2}},
}


@pytest.mark.parametrize("case", list(JOB_REFUSES))
def test_what_plan_refuses_the_job_would_refuse(tmp_path, case):
    pytest.importorskip("trl")
    from launcher.job.config import RunConfig
    from launcher.job.errors import ConfigError
    from launcher.job.recipe_checks import recipe_findings
    from training.arguments import Adjustments, build_sft_config

    run = RunConfig.model_validate(
        {
            "name": "args",
            "run_id": "0123456789",
            "run_dir": str(tmp_path),
            "dataset": {"test_size": 0.1},
            "train": JOB_REFUSES[case],
        }
    )
    assert recipe_findings(run)
    with pytest.raises(ConfigError):
        build_sft_config(run, str(tmp_path / "checkpoints"), cuda=False, adjustments=Adjustments())
