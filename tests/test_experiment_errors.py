"""A catalogue of bad experiment files: each gets one clear error naming file, line and key."""

from __future__ import annotations

import textwrap

import pytest

from launcher.grid import plan
from launcher.job.errors import ConfigError

GOOD = """\
name: demo
train:
  max_steps: 10
"""

CASES = {
    "unknown top-level key": ("name: demo\nmodle:\n  name_or_path: x\n", ":2: modle: unknown key"),
    "typo in a section": ("name: demo\ntrain:\n  lerning_rate: 0.1\n", ":3: train.lerning_rate: unknown key"),
    "wrong type": ("name: demo\ntrain:\n  fp16: maybe\n", ":3: train.fp16: Input should be a valid boolean"),
    "number out of range": ("name: demo\nlora:\n  r: 0\n", ":3: lora.r: Input should be greater than or equal to 1"),
    "missing name": ("train:\n  max_steps: 3\n", ": name: required key is missing"),
    "name unusable for jobs": ("name: My_Experiment\n", ":1: name: must be 1-40 characters"),
    "enum typo": (
        "name: demo\nprompt:\n  template: llama-2\n",
        ":3: prompt.template: Input should be 'llama2', 'chat_template' or 'none'",
    ),
    "section is a scalar": ("name: demo\nlora: 64\n", ":2: lora: Input should be a valid dictionary"),
    "fp16 and bf16": (
        "name: demo\ntrain:\n  fp16: true\n  bf16: true\n",
        "train.fp16 and train.bf16 cannot both be true",
    ),
    "bad time limit": ("name: demo\nresources:\n  time_limit: 2h\n", ":3: resources.time_limit: expected [D-]HH:MM:SS"),
    "bad memory": ("name: demo\nresources:\n  memory: lots\n", ":3: resources.memory: expected a size like 32G"),
    "secret in plain variables": (
        "name: demo\nenvironment:\n  variables:\n    HF_TOKEN: hf_abc\n",
        ":3: environment.variables: 'HF_TOKEN' looks like a secret",
    ),
    "inference batch size a word": (
        "name: demo\ninference:\n  batch_size: big\n",
        ":3: inference.batch_size: must be auto (chosen by memory) or a whole number",
    ),
    "inference batch size zero": (
        "name: demo\ninference:\n  batch_size: 0\n",
        ":3: inference.batch_size: must be auto (chosen by memory) or a whole number",
    ),
    "unknown backend": (
        "name: demo\nbackend: lsf\n",
        ":2: backend: unknown backend 'lsf' (choose from local, slurm, kubernetes",
    ),
    "not yaml": ("name: demo\ntrain: [1, 2\n", ": not valid YAML"),
    "empty file": ("", ": the file is empty"),
    "a list, not a mapping": ("- name: demo\n", ":1: expected a mapping of sections"),
    "grid key unknown": (
        "name: demo\ngrid:\n  train.lr: [0.1, 0.2]\n",
        ":3: grid.train.lr: unknown key 'lr' under train",
    ),
    "grid section unknown": (
        "name: demo\ngrid:\n  optimizer.lr: [0.1]\n",
        ":3: grid.optimizer.lr: unknown key 'optimizer' under top level",
    ),
    "grid value wrong type": (
        "name: demo\ngrid:\n  lora.r: [8,\n    sixteen]\n",
        ":4: grid.lora.r[1] = 'sixteen': Input should be a valid integer",
    ),
    "grid value out of range": (
        "name: demo\ngrid:\n  lora.dropout: [0.1, 1.5]\n",
        "grid.lora.dropout[1] = 1.5: Input should be less than 1",
    ),
    "grid not a list": ("name: demo\ngrid:\n  lora.r: 16\n", ":3: grid.lora.r: Input should be a valid list"),
    "grid empty list": ("name: demo\ngrid:\n  lora.r: []\n", ":3: grid.lora.r: needs at least one value"),
    "grid over the name": ("name: demo\ngrid:\n  name: [a, b]\n", ":3: grid.name: 'name' cannot vary"),
    "grid duplicate point": ("name: demo\ngrid:\n  lora.r: [16, 16]\n", "two grid points resolve to the same run"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_experiment_file_gets_one_clear_error(tmp_path, case):
    text, expected = CASES[case]
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        plan(path)
    message = str(error.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_tokenizer_settings_are_not_mistaken_for_secrets(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: demo\nenvironment:\n  variables:\n    TOKENIZERS_PARALLELISM: 'false'\n")
    (run,) = plan(path).runs
    assert run.environment.variables == {"TOKENIZERS_PARALLELISM": "false"}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no-such.yaml: no such experiment file"):
        plan(tmp_path / "no-such.yaml")


def test_good_file_has_the_notebook_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(GOOD)
    (run,) = plan(path).runs
    assert (run.lora.r, run.lora.alpha, run.lora.dropout) == (64, 16, 0.1)
    assert run.quantization.bnb_4bit_quant_type == "nf4"
    assert run.quantization.bnb_4bit_use_double_quant is False
    assert run.quantization.bnb_4bit_compute_dtype == "float16"
    assert run.train.learning_rate == 2e-4 and run.train.per_device_train_batch_size == 4
    assert run.train.optim == "paged_adamw_32bit" and run.train.max_grad_norm == 0.3
    assert run.train.warmup_ratio == 0.03 and run.train.lr_scheduler_type == "constant"
    assert run.prompt.template == "llama2"


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent("""\
        name: demo
        train:
          learning_rate: 2e-4
          sft_args: {neftune_noise_alpha: 5e0}
    """)
    )
    (run,) = plan(path).runs
    assert run.train.learning_rate == 0.0002
    assert run.train.sft_args == {"neftune_noise_alpha": 5.0}
