"""A real QLoRA training of the tiny Llama on CPU, as the job process a backend starts."""

from __future__ import annotations

import json

import pytest
from training_support import events, run_job, tail

from launcher.job.progress import PROGRESS_PREFIX
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_plan):
    """One tiny run trained to completion: (run, paths, log, exit code)."""
    folder = tmp_path_factory.mktemp("sft")
    run = tiny_plan(folder).runs[0]
    log = folder / "train.log"
    code = run_job("training.sft", RunPaths.of(run).config, log=log, cwd=folder)
    return run, RunPaths.of(run), log, code


def test_training_writes_a_loadable_adapter(trained, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, paths, log, code = trained
    assert code == 0, tail(log)
    assert paths.training_completed()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, paths.adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b, "the adapter has no LoRA weights"
    # LoRA B starts at zero: non-zero weights are what training learned.
    assert any(torch.count_nonzero(p) > 0 for p in lora_b)
    assert (paths.adapter / "tokenizer.json").is_file()


def test_metrics_count_steps_and_real_tokens(trained, tiny_model_dir):
    from transformers import AutoTokenizer

    run, paths, log, code = trained
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["global_step"] == metrics["total_steps"] == STEPS
    assert metrics["train_loss"] > 0 and metrics["train_runtime"] > 0
    assert metrics["tokens_per_second"] > 0
    # Non-padding tokens: between the shortest and the longest example, per example seen.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [
        len(tokenizer(f"<s>[INST] What comes after {n}? [/INST] {n + 1} comes after {n}. </s>")["input_ids"]) + 1
        for n in range(24)
    ]  # + the EOS token trl appends
    seen = STEPS * run.train.per_device_train_batch_size
    assert min(lengths) * seen <= metrics["train_tokens"] <= max(lengths) * seen
    assert "peak_memory_allocated_bytes" not in metrics  # CUDA only


def test_progress_events_in_file_and_log(trained):
    run, paths, log, code = trained
    found = events(run)
    kinds = [e["event"] for e in found]
    assert kinds[0] == "start" and kinds[-1] == "end"
    start = found[0]
    assert (start["attempt"], start["resumed_from"], start["total_steps"]) == (1, None, STEPS)
    steps = [e for e in found if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))  # logging_steps: 1
    for event in steps:
        assert event["loss"] > 0 and event["learning_rate"] > 0 and event["epoch"] > 0
        assert event["tokens_per_second"] > 0
    checkpoints = [e for e in found if e["event"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [4, 8]  # save_steps: 4
    assert found[-1]["status"] == "completed" and found[-1]["step"] == STEPS
    # The same events, prefixed, in the job's output (what a pod log shows).
    logged = [
        json.loads(line.split(PROGRESS_PREFIX, 1)[1])
        for line in log.read_text().splitlines()
        if line.startswith(PROGRESS_PREFIX)
    ]
    assert logged == found


def test_checkpoints_are_complete_and_cpu_changes_are_said_once(trained):
    run, paths, log, code = trained
    names = sorted(p.name for p in paths.checkpoints.iterdir())
    assert names == ["checkpoint-4", "checkpoint-8"]
    for name in names:
        assert (paths.checkpoints / name / "trainer_state.json").is_file()
        assert (paths.checkpoints / name / "optimizer.pt").is_file()
    text = log.read_text()
    assert text.count("no CUDA: optimizer paged_adamw_32bit needs CUDA, using adamw_torch") == 1
    assert text.count("no CUDA: 4-bit compute dtype float16 → float32") == 1


def test_a_finished_run_is_never_trained_again(trained):
    run, paths, log, code = trained
    adapter_mtime = (paths.adapter / "adapter_model.safetensors").stat().st_mtime_ns
    again = paths.root.parent / "again.log"
    assert run_job("training.sft", paths.config, log=again, cwd=paths.root.parent) == 0
    output = again.read_text()
    assert "already completed" in output
    assert PROGRESS_PREFIX not in output and "Loading weights" not in output  # no model, no training
    assert len(events(run, "start")) == 1
    assert (paths.adapter / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime


def test_unknown_sft_arg_fails_with_exit_2_and_an_error_event(tmp_path, tiny_plan):
    """The job checks again what plan time refuses (a run.yaml written by another qlaunch version)."""
    import yaml

    run = tiny_plan(tmp_path).runs[0]
    config = RunPaths.of(run).config
    data = yaml.safe_load(config.read_text())
    data["train"]["sft_args"] = {"not_a_knob": 1}
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "train.log"
    assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=tmp_path) == 2
    assert "train.sft_args.not_a_knob" in log.read_text()
    [error] = events(run, "error")
    assert error["message"].startswith("train.sft_args.not_a_knob:")


def test_random_init_needs_only_the_models_config(tmp_path, tiny_plan, tiny_model_dir):
    """`model.init: random` (benchmarks of big shapes): no weight file is read."""
    import shutil

    shapes_only = tmp_path / "config-only"
    shapes_only.mkdir()
    for item in tiny_model_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, shapes_only / item.name)
    run = tiny_plan(tmp_path, model={"name_or_path": str(shapes_only), "init": "random"}, train={"max_steps": 2}).runs[
        0
    ]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    assert paths.training_completed()
    adapter_config = json.loads((paths.adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(shapes_only)
