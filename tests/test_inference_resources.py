"""The inference job's own request (inference.resources; launcher.jobspec.inference_resources):
not a copy of training's, rendered for Slurm and Kubernetes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import kubernetes_validate
import pytest

from launcher.backends.kubernetes.manifests import evaluation_documents, run_documents
from launcher.backends.slurm.script import render_run
from launcher.grid import plan
from launcher.jobspec import inference_job

# What the issue saw: training asks for 6 h, 48G, 8 CPUs and a GPU.
TRAINING = "{gpus_per_node: 2, cpus_per_task: 8, memory: 48G, time_limit: '06:00:00'}"


def _run(
    tmp_path: Path,
    backend: str = "slurm",
    resources: str = TRAINING,
    inference: str = "{}",
    model: str = "NousResearch/Llama-2-7b-chat-hf",
):
    path = tmp_path / "e.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: infer-res
        backend: {backend}
        model: {{name_or_path: {model}}}
        storage: {{root: {tmp_path / "runs"}}}
        resources: {resources}
        inference: {inference}
    """)
    )
    p = plan(path)
    return p, p.runs[0]


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_inference_asks_for_what_answering_prompts_needs(tmp_path):
    _, run = _run(tmp_path)
    scripts = render_run(run)
    infer = _directives(scripts.infer)
    # Llama-2-7B: 6.7e9 parameters × 2 bytes pass through host memory while loading, + 4 GiB.
    for wanted in ("--time=01:00:00", "--mem=17G", "--cpus-per-task=4", "--gres=gpu:t4:1"):
        assert wanted in infer
    train = _directives(scripts.train)
    for kept in ("--time=06:00:00", "--mem=48G", "--cpus-per-task=8", "--gres=gpu:t4:2"):
        assert kept in train


def test_inference_resources_override_each_value(tmp_path):
    _, run = _run(
        tmp_path, inference="{resources: {gpus_per_node: 0, cpus_per_task: 2, memory: 24G, time_limit: '00:20:00'}}"
    )
    infer = _directives(render_run(run).infer)
    assert {"--time=00:20:00", "--mem=24G", "--cpus-per-task=2"} <= set(infer)
    assert not any(d.startswith("--gres") for d in infer)


def test_derived_values_never_exceed_trainings(tmp_path):
    _, run = _run(tmp_path, resources="{gpus_per_node: 0, cpus_per_task: 2, memory: 6G, time_limit: '00:30:00'}")
    res = inference_job(run).resources
    assert (res.gpus_per_node, res.cpus_per_task, res.memory, res.time_limit) == (0, 2, "6G", "00:30:00")


@pytest.mark.parametrize(
    "model, memory",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "5G"),  # 0.13e9 params: mostly headroom
        ("meta-llama/Llama-2-13b-hf", "29G"),
        ("someone/unknown-model", "16G"),  # not in the known table: 16G, say inference.resources.memory
    ],
)
def test_memory_follows_the_model_size(tmp_path, model, memory):
    _, run = _run(tmp_path, model=model)
    assert inference_job(run).resources.memory == memory


def test_kubernetes_inference_job_has_its_own_request_and_deadline(tmp_path):
    p, run = _run(tmp_path, backend="kubernetes")
    # The grid's evaluation Job is its runs' inference (issue #29).
    train = next(d for d in run_documents(p, run) if d["kind"] == "Job")
    infer = next(d for d in evaluation_documents(p, p.runs) if d["kind"] == "Job")
    resources = infer["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"limits": {"memory": "17Gi", "nvidia.com/gpu": 1}, "requests": {"cpu": "4", "memory": "17Gi"}}
    assert infer["spec"]["activeDeadlineSeconds"] == 3600
    assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "48Gi"}
    assert train["spec"]["activeDeadlineSeconds"] == 6 * 3600
    for version in ("1.30", "1.37"):
        kubernetes_validate.validate(infer, version, strict=True)


def test_bad_inference_resources_are_refused(tmp_path):
    from launcher.job.errors import ConfigError

    with pytest.raises(ConfigError, match="inference.resources.time_limit"):
        _run(tmp_path, inference="{resources: {time_limit: '1h'}}")
