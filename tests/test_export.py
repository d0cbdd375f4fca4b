"""`qlaunch export`: the adapter, the merge checked against the unmerged model, GGUF, the hub.

One tiny adapter is trained and evaluated for the whole module (`trained`), and exported once with
`--best --merge --gguf --push-to-hub` (`exported`, against tests/fake_hub with the real
huggingface_hub client); the other tests read that export or refuse before any model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_support import REPO, run_job, tail

from launcher.grid import plan
from launcher.job.storage import RunPaths, write_json
from tests.fake_hub import FakeHub

TOKEN = "hf_exportSecretToken0123456789"
READ_TOKEN = "hf_readOnlyToken0123456789ab"
ANSWER = "OK"
ROWS = [{"instruction": f"Is {n} a number?", "response": ANSWER} for n in range(24)]
EVALS = [{"prompt": f"Is {n} a number?", "reference": ANSWER} for n in (100, 200, 300)]


@pytest.fixture(scope="module")
def hub():
    server = FakeHub().start()
    server.add_user(TOKEN, "alice", orgs=("team",))
    server.add_user(READ_TOKEN, "bob", role="read")
    yield server
    server.stop()


def qlaunch(folder: Path, *args: str, endpoint: str = "http://127.0.0.1:9", token: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(folder / "hf-home"),
            "QLAUNCH_HOME": str(folder / "qlaunch-home"),
            "OMP_NUM_THREADS": "1",
            **({"HF_TOKEN": token} if token else {}),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_plan):
    """A trained and evaluated tiny run (learns to answer "OK")."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVALS))
    p = tiny_plan(
        folder,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        train={
            "max_steps": 40,
            "learning_rate": 0.01,
            "per_device_train_batch_size": 4,
            "save_steps": 1000,
            "logging_steps": 10,
            "warmup_ratio": 0.0,
        },
        inference={
            "prompts": ["Is 7 a number?"],
            "eval_file": "eval.jsonl",
            "metric": "exact_match",
            "max_new_tokens": 4,
            "compare_base": False,
        },
    )
    run = p.runs[0]
    paths = RunPaths.of(run)
    assert run_job("training.sft", paths.config, log=folder / "train.log", cwd=folder) == 0, tail(folder / "train.log")
    assert run_job("training.infer", paths.config, log=folder / "infer.log", cwd=folder) == 0, tail(
        folder / "infer.log"
    )
    return p, run, folder


@pytest.fixture(scope="module")
def exported(trained, hub):
    p, run, folder = trained
    done = qlaunch(
        folder,
        "export",
        str(p.source),
        "--best",
        "--merge",
        "--gguf",
        "--push-to-hub",
        "alice/tiny-merged",
        endpoint=hub.endpoint,
        token=TOKEN,
    )
    out = RunPaths.of(run).root / "export"
    return p, run, folder, done, out


def everything_written(*roots: Path) -> bytes:
    return b"".join(f.read_bytes() for root in roots for f in root.rglob("*") if f.is_file())


@pytest.mark.slow
def test_best_export_ships_the_closer_merge_checked_against_the_unmerged_model(exported):
    p, run, folder, done, out = exported
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "export.json").read_text())
    check = record["merge_check"]
    assert set(check["candidates"]) == {"dequantized-4bit", "float16"}
    for result in check["candidates"].values():
        assert {"max_logit_diff", "mean_logit_diff", "top1_token_agreement", "answer_agreement", "metric"} <= set(
            result
        )
    chosen = check["candidates"][check["chosen"]]
    # The shipped merge answers exactly as the model that was trained and evaluated.
    assert chosen["answer_agreement"] == 1.0 and chosen["metric"] == check["unmerged_metric"] == 1.0
    # The adapter learned on dequant(NF4(W)): merging there is closer than merging into W.
    assert check["chosen"] == "dequantized-4bit"
    assert chosen["mean_logit_diff"] < check["candidates"]["float16"]["mean_logit_diff"]
    card = (out / "README.md").read_text()
    assert "## Merge check" in card and "dequantized-4bit" in card and run.run_id in card
    assert "exact_match** on 3 held-out examples: base" in card
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_the_f16_gguf_loads_back_and_answers_the_same(exported):
    _, _, _, done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    gguf = json.loads((out / "export.json").read_text())["gguf"]
    assert (out / gguf["file"]).is_file() and gguf["type"] == "f16"
    assert gguf["answer_agreement"] == 1.0 and gguf["max_logit_diff"] == 0.0 and gguf["tokenizer_ids_equal"]


@pytest.mark.slow
def test_a_q8_0_gguf_answers_within_tolerance(exported, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.export import _tokenizer, compare, probe
    from training.gguf_export import write_gguf

    _, run, _, done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    write_gguf(out, tmp_path / "q8.gguf", "q8_0", "tiny")
    prompts, references = [e["prompt"] for e in EVALS], [e["reference"] for e in EVALS]
    tokenizer = _tokenizer(RunPaths.of(run))
    exact = lambda a, r: float(a.strip() == r)  # noqa: E731
    merged = probe(
        run, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokenizer, prompts, references, None, exact
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32)
    result = compare(merged, probe(run, loaded, tokenizer, prompts, references, merged.answers, exact), len(EVALS))
    assert result["passes"] and result["answer_agreement"] == 1.0, result
    assert 0 < result["max_logit_diff"] < 1.0  # 8-bit blocks: close, not equal
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="q8.gguf")
    assert gguf_tokenizer(prompts[0]).input_ids == tokenizer(prompts[0]).input_ids


@pytest.mark.slow
def test_the_push_is_private_has_every_file_and_answers_the_same_from_the_hub(exported, hub):
    p, run, folder, done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "export.json").read_text())
    repo = hub.repos[("model", "alice/tiny-merged")]
    assert repo.private
    assert record["hub"]["revision"] == repo.refs["main"] and record["hub"]["private"] is True
    pushed = hub.files("model", "alice/tiny-merged")
    assert {"config.json", "model.safetensors", "README.md", "export.json", record["gguf"]["file"]} <= set(pushed)
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from launcher.job.experiment_file import load_run_config\n"
        "from training.export import _tokenizer\nfrom training.infer import generate\n"
        "from launcher.job.storage import RunPaths\n"
        "run = load_run_config(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained('alice/tiny-merged', revision=sys.argv[2], dtype=torch.float32)\n"
        "print(json.dumps(generate(run, model, _tokenizer(RunPaths.of(run)), sys.argv[3:])))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        PYTHONPATH=str(REPO),
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(folder / "reader-hf-home"),
        HF_TOKEN=TOKEN,
        OMP_NUM_THREADS="1",
    )
    prompts = [e["prompt"] for e in EVALS]
    answered = subprocess.run(
        [sys.executable, "-c", script, str(RunPaths.of(run).config), record["hub"]["revision"], *prompts],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert json.loads(answered.stdout.strip().splitlines()[-1]) == [ANSWER] * len(prompts)
    env.pop("HF_TOKEN")
    env["HF_HOME"] = str(folder / "anonymous-hf-home")
    refused = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import model_info; model_info('alice/tiny-merged')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "RepositoryNotFound" in refused.stderr  # private: 404 without the token
    # The token is in no file and no output.
    assert TOKEN.encode() not in everything_written(p.storage_root, out)
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.slow
def test_status_json_and_the_report_show_the_export(exported):
    p, run, folder, done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(qlaunch(folder, "status", str(p.source), "--json").stdout)
    [entry] = status["runs"][0]["exports"]
    assert entry["path"] == str(out) and entry["kind"] == "merged" and entry["merge_base"] == "dequantized-4bit"
    assert entry["hub"]["repo_id"] == "alice/tiny-merged" and entry["gguf"].endswith("-f16.gguf")
    reported = qlaunch(folder, "report", str(p.source), "--json", "-o", str(folder / "report"))
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert json.loads(reported.stdout)["runs"][0]["exports"] == status["runs"][0]["exports"]
    assert f"- {run.run_id}: merged → {out} (hub alice/tiny-merged @" in (folder / "report" / "report.md").read_text()


@pytest.mark.slow
def test_adapter_only_export_is_the_adapter_a_card_and_export_json(trained, tmp_path):
    p, run, folder = trained
    done = qlaunch(folder, "export", str(p.source), "--run", run.run_id[:6], "-o", str(tmp_path / "adapter"))
    assert done.returncode == 0, done.stderr[-3000:]
    files = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "export.json"} <= files
    assert not any(
        name.endswith((".gguf", "model.safetensors")) and name != "adapter_model.safetensors" for name in files
    )
    record = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert record["kind"] == "adapter" and record["run_id"] == run.run_id and "merge_check" not in record
    assert "PeftModel.from_pretrained" in (tmp_path / "adapter" / "README.md").read_text()


# --- refused before anything is written -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, token, message",
    [
        (
            ("--push-to-hub", "alice/x"),
            None,
            "--push-to-hub alice/x: no hub token ($HF_TOKEN is empty or unset); nothing was exported",
        ),
        (
            ("--push-to-hub", "carol/x"),
            TOKEN,
            "--push-to-hub carol/x: the token from $HF_TOKEN (user alice, role write) cannot write to carol/",
        ),
        (("--push-to-hub", "bob/x"), READ_TOKEN, "cannot write to bob/"),
        (
            ("--push-to-hub", "alice/x"),
            "hf_unknownToken000000000000",
            "the hub refused the token from $HF_TOKEN (HTTP 401)",
        ),
    ],
)
def test_a_push_that_cannot_happen_is_refused_before_the_merge(trained, hub, tmp_path, args, token, message):
    p, run, folder = trained
    posts = hub.count("POST")
    done = qlaunch(
        folder,
        "export",
        str(p.source),
        "--run",
        run.run_id,
        "--merge",
        "-o",
        str(tmp_path / "out"),
        *args,
        endpoint=hub.endpoint,
        token=token,
    )
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split()) and done.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*")) and hub.count("POST") == posts
    if token:
        assert token not in done.stdout + done.stderr


def test_an_unknown_or_unfinished_run_and_best_without_evaluation_are_one_error(tmp_path, tiny_plan):
    p = tiny_plan(tmp_path, grid={"lora.r": [4, 8]})
    first, second = p.runs
    unknown = qlaunch(tmp_path, "export", str(p.source), "--run", "ffffff")
    assert unknown.returncode == 2 and "no run 'ffffff' in experiment 'tiny'" in unknown.stderr
    unfinished = qlaunch(tmp_path, "export", str(p.source), "--run", first.run_id)
    assert unfinished.returncode == 2
    assert f"run {first.run_id} has not finished training (state: unknown)" in " ".join(unfinished.stderr.split())
    best = qlaunch(tmp_path, "export", str(p.source), "--best")
    assert best.returncode == 2 and "--best: no run of tiny has been evaluated yet" in " ".join(best.stderr.split())
    gguf_alone = qlaunch(tmp_path, "export", str(p.source), "--run", first.run_id, "--gguf")
    assert gguf_alone.returncode == 2 and "--gguf writes the merged model: add --merge" in gguf_alone.stderr
    assert not any(RunPaths.of(run).root.joinpath("export").exists() for run in p.runs)


def test_best_is_the_run_the_report_ranks_first(tmp_path, tiny_plan):
    from launcher.export_command import pick_run

    p = tiny_plan(tmp_path, grid={"lora.r": [4, 8, 16]})
    for run, tuned in zip(p.runs, (0.5, 0.9, 0.7)):
        paths = RunPaths.of(run)
        write_json(paths.adapter / "adapter_config.json", {})
        write_json(paths.metrics, {"global_step": 8})
        write_json(
            paths.inference / "summary.json", {"metric": {"name": "exact_match", "base": 0.0, "tuned": tuned, "n": 3}}
        )
    assert pick_run(plan(p.source), None, best=True).run_id == p.runs[1].run_id


def test_a_merge_neither_base_matches_is_refused_with_the_numbers():
    import torch

    from training.export import Probe, compare

    logits = [torch.zeros(3, 5)]
    reference = Probe(["OK", "OK", "OK"], logits, 1.0)
    broken = Probe(["OK", "no", "no"], [torch.ones(3, 5)], 1 / 3)
    result = compare(reference, broken, n_scored=3)
    assert result["passes"] is False
    assert result["answer_agreement"] == pytest.approx(1 / 3, abs=1e-3) and result["max_logit_diff"] == 1.0
    # One flipped answer out of 10 is within tolerance (near-ties), a metric drop beyond 1/n is not.
    assert compare(Probe(["a"] * 10, logits, 0.8), Probe(["a"] * 9 + ["b"], logits, 0.7), 10)["passes"] is True
    assert compare(Probe(["a"] * 10, logits, 0.8), Probe(["a"] * 9 + ["b"], logits, 0.6), 10)["passes"] is False


def test_a_merge_that_does_not_fit_this_machine_is_refused(tmp_path, tiny_plan):
    from launcher.export_command import check_merge_memory
    from launcher.job.errors import QlaunchError

    run = tiny_plan(tmp_path, model={"name_or_path": "NousResearch/Llama-2-7b-chat-hf"}).runs[0]
    with pytest.raises(QlaunchError, match=r"needs about 4\d\.\d GiB of host memory .* 16\.0 GiB available"):
        check_merge_memory(run, available=16 * 2**30)
    check_merge_memory(run, available=64 * 2**30)


# --- the quickstart model -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_quickstart_models_best_run_exports_a_merge_and_gguf_that_answer_like_it(tmp_path):
    """examples/quickstart.yaml's first grid point (SmolLM2-135M-Instruct, NF4, r=16 on all linear
    layers), on 8 of its 40 held-out examples (+ its 2 free prompts) to fit a test: trained and
    evaluated by `qlaunch run`, then `qlaunch export --best --merge --gguf` here."""
    import shutil
    import time

    import yaml

    examples = REPO / "examples"
    (tmp_path / "data").mkdir()
    shutil.copy(examples / "data" / "train.jsonl", tmp_path / "data" / "train.jsonl")
    evals = (examples / "data" / "eval.jsonl").read_text().splitlines(keepends=True)[:8]
    (tmp_path / "data" / "eval.jsonl").write_text("".join(evals))
    data = yaml.safe_load((examples / "quickstart.yaml").read_text())
    data.pop("grid")  # one run: the first grid point, learning rate 1e-3
    data["storage"] = {"root": str(tmp_path / "runs")}
    source = tmp_path / "quickstart.yaml"
    source.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.monotonic()
    ran = qlaunch(tmp_path, "run", str(source))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    trained_at = time.monotonic()
    done = qlaunch(tmp_path, "export", str(source), "--best", "--merge", "--gguf")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(
        f"quickstart: trained + evaluated in {trained_at - started:.0f} s, exported in {time.monotonic() - trained_at:.0f} s"
    )
    [run] = plan(source).runs
    out = RunPaths.of(run).root / "export"
    record = json.loads((out / "export.json").read_text())
    check = record["merge_check"]
    print("merge check:", json.dumps(check["candidates"]), "gguf:", json.dumps(record["gguf"]))
    assert check["prompts"] == 10 and check["eval_examples"] == 8 and check["metric_name"] == "json_match"
    # Both merge bases measured and recorded; the one the adapter trained on ships, and answers as
    # the unmerged model (4-bit base + adapter) does on every prompt, with the same metric.
    assert set(check["candidates"]) == {"dequantized-4bit", "float16"} and check["chosen"] == "dequantized-4bit"
    chosen, float16 = check["candidates"]["dequantized-4bit"], check["candidates"]["float16"]
    assert chosen["answer_agreement"] == 1.0 and chosen["metric"] == check["unmerged_metric"]
    assert chosen["mean_logit_diff"] < float16["mean_logit_diff"]
    # The f16 GGUF, loaded back by transformers, is the merged model: identical logits and answers.
    gguf = record["gguf"]
    assert (out / gguf["file"]).is_file() and gguf["type"] == "f16" and gguf["tokenizer_ids_equal"]
    assert gguf["answer_agreement"] == 1.0 and gguf["max_logit_diff"] == 0.0
