"""The admin-applied YAML in manifests/: core kinds pass kubernetes-validate --strict; the CRD
kinds (Kueue, kind's config) have no schema there, so they are parsed and their kind checked."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.test_k8s_render import SCHEMA_VERSIONS

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
NOT_IN_SCHEMA = {"kueue.x-k8s.io/v1beta1", "kind.x-k8s.io/v1alpha4"}
EXPECTED = {
    "storage.yaml": [("v1", "Namespace"), ("v1", "PersistentVolumeClaim")],
    "priority.yaml": [("scheduling.k8s.io/v1", "PriorityClass")] * 2,
    "kueue-t4.yaml": [
        ("kueue.x-k8s.io/v1beta1", "ResourceFlavor"),
        ("kueue.x-k8s.io/v1beta1", "ClusterQueue"),
        ("kueue.x-k8s.io/v1beta1", "LocalQueue"),
    ],
    "kind-test-cluster.yaml": [("kind.x-k8s.io/v1alpha4", "Cluster")],
    "kind-test-storage.yaml": [("v1", "Namespace"), ("v1", "PersistentVolume"), ("v1", "PersistentVolumeClaim")],
}


def documents(name):
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def test_every_yaml_file_is_listed_and_has_the_expected_kinds():
    assert sorted(p.name for p in MANIFESTS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kinds in EXPECTED.items():
        assert [(d["apiVersion"], d["kind"]) for d in documents(name)] == kinds, name


# Files with core kinds; the Kueue and kind files hold only kinds kubernetes-validate has no
# schema for (their kinds are checked above).
CORE_FILES = sorted(name for name, kinds in EXPECTED.items() if any(v not in NOT_IN_SCHEMA for v, _ in kinds))


@pytest.mark.parametrize("name", CORE_FILES)
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_core_kinds_are_valid(name, version):
    core = [d for d in documents(name) if d["apiVersion"] not in NOT_IN_SCHEMA]
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_readme_names_every_file():
    text = (MANIFESTS / "README.md").read_text()
    assert all(f"`{name}`" in text for name in EXPECTED)
