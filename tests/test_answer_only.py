"""Answer-only loss (train.completion_only_loss): which runs get it, what their ids become, and
which tokens trl and the packed-rows collator leave out of the loss, on SmolLM2's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from training_support import run_job, tail

from launcher.grid import plan
from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.storage import RunPaths

ROWS = [
    {"instruction": "What comes after 3?", "response": "4 comes after 3."},
    {"instruction": "Name a colour.", "response": "Blue."},
    {"instruction": "Say hello in French.", "response": "Bonjour."},
]


def experiment(folder: Path, rows: list[dict], **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "pinned", "dataset": {"path": "data.jsonl"}, "lora": {"r": 8}, **sections}))
    return path


# --- which runs get it, and their ids -----------------------------------------------------------


def test_text_runs_keep_the_id_they_had_before_the_key_existed(tmp_path):
    path = experiment(tmp_path, [{"text": "<s>[INST] Hi [/INST] Hello </s>"}])
    run = plan(path).runs[0]
    assert run.train.completion_only_loss is False  # resolved from the file's columns
    assert run.run_id == "306b2ab2b9"  # qlaunch before train.completion_only_loss, same file
    explicit = experiment(tmp_path / "explicit", [{"text": "x"}], train={"completion_only_loss": False})
    assert plan(explicit).runs[0].run_id == run.run_id


def test_instruction_runs_train_on_answers_by_default_under_a_new_id(tmp_path):
    run = plan(experiment(tmp_path / "default", [ROWS[0]])).runs[0]
    assert run.train.completion_only_loss is True
    assert run.run_id != "306b2ab2b9"  # the same file's id when it trained on the whole text
    explicit = plan(experiment(tmp_path / "on", [ROWS[0]], train={"completion_only_loss": True})).runs[0]
    whole = plan(experiment(tmp_path / "off", [ROWS[0]], train={"completion_only_loss": False})).runs[0]
    assert explicit.run_id == run.run_id
    assert whole.run_id == "306b2ab2b9"  # whole-text loss is what the old id trained


def test_a_grid_over_the_loss_gives_two_runs(tmp_path):
    path = experiment(tmp_path, [ROWS[0]], grid={"train.completion_only_loss": [True, False]})
    runs = plan(path).runs
    assert [r.train.completion_only_loss for r in runs] == [True, False]
    assert len({r.run_id for r in runs}) == 2


def test_answer_only_on_text_data_is_an_error_naming_the_key(tmp_path):
    path = experiment(tmp_path, [{"text": "x"}], train={"completion_only_loss": True})
    with pytest.raises(ConfigError, match=r"exp\.yaml: train\.completion_only_loss: true needs instruction"):
        plan(path)


def test_a_hub_dataset_in_auto_format_is_left_to_the_job(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: hub\n")  # the notebook's guanaco-llama2-1k, format auto
    run = plan(path).runs[0]
    assert run.train.completion_only_loss is None  # planned without reading the hub
    assert run.run_id == "1b3789eb2c"  # the notebook recipe's id, as before the key existed


# --- which tokens are scored ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def prepared(tmp_path, tiny_model, tokenizer, template: str, packing: bool):
    """The run's dataset as trl's SFTTrainer prepares it, the run, and the trainer."""
    from trl import SFTTrainer

    from training.arguments import Adjustments, build_sft_config
    from training.formatting import build_train_dataset, load_records
    from training.packing import use_packed_rows

    path = experiment(
        tmp_path,
        ROWS,
        prompt={"template": template, "system_prompt": "Be brief."},
        train={"packing": packing, "max_seq_length": 256, "group_by_length": False},
    )
    run = plan(path).runs[0]
    dataset, answer_only = build_train_dataset(run, tokenizer, load_records(run))
    assert answer_only and dataset.column_names == ["prompt", "completion"]
    args = build_sft_config(
        run, str(tmp_path / "out"), cuda=False, adjustments=Adjustments(), completion_only_loss=True
    )
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if packing:
        assert use_packed_rows(trainer, tiny_model)
    return run, trainer


def expected_split(run: RunConfig, tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt exactly as inference asks it, the answer + EOS."""
    from training.formatting import format_prompt, format_row, without_leading_bos

    prompt = without_leading_bos(format_prompt(run, tokenizer, row["instruction"]), tokenizer)
    full = without_leading_bos(format_row(run, tokenizer, row, "instruction"), tokenizer)
    if not full.endswith(tokenizer.eos_token):
        full += tokenizer.eos_token
    prompt_ids, full_ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full_ids[len(prompt_ids) :]


@pytest.mark.parametrize("template", ["llama2", "chat_template"])
def test_labels_are_ignored_exactly_over_the_prompt(tmp_path, tiny_model, smol_tokenizer, template):
    run, trainer = prepared(tmp_path, tiny_model, smol_tokenizer, template, packing=False)
    examples = list(trainer.train_dataset)
    assert len(examples) == len(ROWS)
    for example, row in zip(examples, ROWS):  # not shuffled: the dataset's order
        ids = example["input_ids"]
        prompt_ids, answer_ids = expected_split(run, smol_tokenizer, row)
        assert ids == prompt_ids + answer_ids
        batch = trainer.data_collator([example])
        labels = batch["labels"][0].tolist()
        assert labels == [-100] * len(prompt_ids) + answer_ids
        assert smol_tokenizer.decode(answer_ids).strip().startswith(row["response"])


@pytest.mark.parametrize("template", ["llama2", "chat_template"])
def test_packed_rows_ignore_every_prompt_and_score_every_answer(tmp_path, tiny_model, smol_tokenizer, template):
    run, trainer = prepared(tmp_path, tiny_model, smol_tokenizer, template, packing=True)
    rows = list(trainer.train_dataset)
    assert len(rows) == 1 and len(rows[0]["seq_lengths"]) == len(ROWS)  # all three in one packed row
    batch = trainer.data_collator(rows)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    at, seen = 0, set()
    for length in rows[0]["seq_lengths"]:
        segment = ids[at : at + length]
        row = next(r for r in ROWS if sum(expected_split(run, smol_tokenizer, r), []) == segment)
        prompt_ids, answer_ids = expected_split(run, smol_tokenizer, row)
        assert labels[at : at + length] == [-100] * len(prompt_ids) + answer_ids
        seen.add(row["instruction"])
        at += length
    assert len(seen) == len(ROWS)
    assert set(labels[at:]) <= {-100}  # padding


# --- a real run -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_run_trains_on_the_answers_only(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path, train={"max_steps": 3, "save_steps": 10})
    (run,) = run.runs
    assert run.train.completion_only_loss is True  # the tiny dataset is instruction data
    log = tmp_path / "train.log"
    code = run_job("training.sft", RunPaths.of(run).config, log=log, cwd=tmp_path)
    assert code == 0, tail(log)
    assert "loss: the answers only" in log.read_text()
    metrics = json.loads(RunPaths.of(run).metrics.read_text())
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0
