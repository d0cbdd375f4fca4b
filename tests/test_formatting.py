"""Prompt formatting: the exact strings a model is trained on and prompted with."""

from __future__ import annotations

import json

import pytest

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from training.formatting import (
    Turn,
    build_text_dataset,
    format_prompt,
    format_row,
    llama2_text,
    load_records,
    without_leading_bos,
)


def run_config(tmp_path, **sections) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "fmt",
            "run_id": "0123456789",
            "run_dir": str(tmp_path / "run"),
            "experiment_dir": str(tmp_path),
            **sections,
        }
    )


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- llama2 ---------------------------------------------------------------------------------------


def test_llama2_with_system_prompt():
    text = llama2_text([Turn("What is QLoRA?", "A way to fine-tune.")], system="You are terse.")
    assert text == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is QLoRA? [/INST] A way to fine-tune. </s>"


def test_llama2_without_system_prompt_has_no_sys_block():
    assert llama2_text([Turn("Hi", "Hello")]) == "<s>[INST] Hi [/INST] Hello </s>"


def test_llama2_strips_user_and_answer_like_the_reference_code():
    assert llama2_text([Turn("  Hi \n", "\nHello  ")]) == "<s>[INST] Hi [/INST] Hello </s>"


def test_llama2_multi_turn_puts_system_in_the_first_turn_only():
    text = llama2_text([Turn("Hi", "Hello"), Turn("Bye", "See you")], system="S")
    assert text == ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] See you </s>")


def test_llama2_prompt_ends_after_inst(tmp_path):
    run = run_config(tmp_path, prompt={"template": "llama2", "system_prompt": "Be kind."})
    assert format_prompt(run, None, "Tell me a joke") == (
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nTell me a joke [/INST]"
    )


def test_instruction_rows_join_instruction_and_input(tmp_path):
    run = run_config(tmp_path, dataset={"input_field": "input"})
    row = {"instruction": "Summarize.", "input": "A long text.", "response": "Short."}
    assert format_row(run, None, row, "instruction") == "<s>[INST] Summarize.\n\nA long text. [/INST] Short. </s>"
    row["input"] = ""
    assert format_row(run, None, row, "instruction") == "<s>[INST] Summarize. [/INST] Short. </s>"


def test_system_column_overrides_the_default_system_prompt(tmp_path):
    run = run_config(tmp_path, dataset={"system_field": "sys"}, prompt={"system_prompt": "default"})
    row = {"instruction": "Q", "response": "A", "sys": "from the row"}
    assert format_row(run, None, row, "instruction") == "<s>[INST] <<SYS>>\nfrom the row\n<</SYS>>\n\nQ [/INST] A </s>"


def test_messages_rows_in_llama2(tmp_path):
    run = run_config(tmp_path)
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    assert format_row(run, None, row, "messages") == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] A2 </s>"
    )


def test_messages_with_wrong_roles_name_the_row(tmp_path):
    run = run_config(tmp_path)
    row = {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}]}
    with pytest.raises(ConfigError, match="dataset row 7: roles must alternate user/assistant"):
        format_row(run, None, row, "messages", where="dataset row 7")


# --- chat_template and BOS ------------------------------------------------------------------------


def test_chat_template_uses_the_tokenizers_template_and_ends_on_eos(tmp_path, smol_tokenizer):
    run = run_config(tmp_path, prompt={"template": "chat_template", "system_prompt": "Be brief."})
    text = format_row(run, smol_tokenizer, {"instruction": "Hi", "response": "Hello"}, "instruction")
    # Ends on EOS (<|im_end|>) itself, so trl does not append a second EOS after a newline.
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>"
    )
    assert format_prompt(run, smol_tokenizer, "Hi") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_double_bos_when_the_tokenizer_adds_one(tiny_model_dir):
    from transformers import AutoTokenizer

    adds = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=True)
    bos = adds.bos_token
    text = f"{bos}user\nHi"
    ids = adds(without_leading_bos(text, adds))["input_ids"]
    assert ids[0] == adds.bos_token_id and ids[1] != adds.bos_token_id
    assert ids == adds(text, add_special_tokens=False)["input_ids"]

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)  # adds no BOS: the text stays as it is
    assert without_leading_bos(text, plain) == text


# --- datasets -------------------------------------------------------------------------------------


def test_local_jsonl_csv_and_parquet_become_one_text_column(tmp_path, smol_tokenizer):
    import pandas as pd

    rows = [{"instruction": "Q1", "response": "A1"}, {"instruction": "Q2", "response": "A2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        run = run_config(tmp_path, dataset={"path": name})  # relative to the experiment's folder
        data = build_text_dataset(run, smol_tokenizer, load_records(run))
        assert data.column_names == ["text"]
        assert data["text"] == ["<s>[INST] Q1 [/INST] A1 </s>", "<s>[INST] Q2 [/INST] A2 </s>"]


def test_ready_text_column_is_used_as_is(tmp_path, smol_tokenizer):
    text = "<s>[INST] Hola [/INST] Hola, ¿qué tal? </s>"
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text, "prompt": "ignored"}) + "\n")
    run = run_config(tmp_path, dataset={"path": "t.jsonl", "max_samples": 5}, prompt={"template": "none"})
    assert build_text_dataset(run, smol_tokenizer, load_records(run))["text"] == [text]


def test_unrecognised_columns_are_one_clear_error(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    run = run_config(tmp_path, dataset={"path": "x.jsonl"})
    with pytest.raises(ConfigError, match=r"dataset.path: cannot tell .*\['answer', 'question'\]"):
        build_text_dataset(run, None, load_records(run))


def test_template_none_needs_a_text_column(tmp_path):
    (tmp_path / "i.jsonl").write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    run = run_config(tmp_path, dataset={"path": "i.jsonl"}, prompt={"template": "none"})
    with pytest.raises(ConfigError, match="prompt.template: 'none'"):
        build_text_dataset(run, None, load_records(run))


def test_missing_local_file_is_named(tmp_path):
    run = run_config(tmp_path, dataset={"path": "nope.jsonl"})
    with pytest.raises(ConfigError, match="dataset.path: no such file .*nope.jsonl"):
        load_records(run)
