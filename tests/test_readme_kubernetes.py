"""The README's GKE / EKS experiment snippets render to Jobs that select T4 nodes the way the
README's table says (a claim in the README is a claim the tests check)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.grid import plan

README = Path(__file__).resolve().parents[1] / "README.md"


def _platform_snippets() -> list[str]:
    section = README.read_text().split("### On GKE, EKS or on-prem with T4 nodes", 1)[1].split("\n## ", 1)[0]
    section = section.split("\nGPU nodes:", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


def _training_pod(tmp_path: Path, snippet: str) -> dict:
    tmp_path.mkdir()
    path = tmp_path / "exp.yaml"
    path.write_text("name: platform\n" + snippet)
    (rendered,) = [f for f in KubernetesBackend().render(plan(path), tmp_path / "out") if f.name != "evaluate.yaml"]
    jobs = [d for d in yaml.safe_load_all(rendered.read_text()) if d and d["kind"] == "Job"]
    return jobs[0]["spec"]["template"]["spec"]


def test_gke_and_eks_snippets_select_t4_nodes(tmp_path):
    gke, eks = _platform_snippets()
    assert _training_pod(tmp_path / "gke", gke)["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"
    }
    eks_pod = _training_pod(tmp_path / "eks", eks)
    assert eks_pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g4dn.xlarge"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in eks_pod["tolerations"]
