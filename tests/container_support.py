"""Helpers for the tests that run the job image (no tests of its own): build it, and start a
rendered Kubernetes pod spec with `docker run` the way the kubelet would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "docker" / "build_test_image.sh"


def docker_or_fail() -> str:
    """The docker client, or skip on a developer machine without one. On CI (CI=true) a missing
    Docker fails the test: the container tests must never pass by being skipped."""
    docker = shutil.which("docker")
    answers = (
        docker is not None
        and subprocess.run([docker, "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    )
    if answers:
        return docker
    why = "no Docker daemon answers (bash docker/dockerd.sh up)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; CI must run the container tests")
    pytest.skip(why)


def build_test_image(log: Path) -> str:
    """docker/build_test_image.sh (needs Docker: docker_or_fail first). Cached layers make a
    rebuild take seconds, so each test module builds it. Returns the tag."""
    with open(log, "wb") as out:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=out, timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"building the test image failed:\n{log.read_text(errors='replace')[-4000:]}")
    return result.stdout.decode().strip().splitlines()[-1]


def _docker_size(quantity: str) -> str:
    """A Kubernetes quantity (8Gi, 512Mi) as docker's size argument (8g, 512m)."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity).groups()
    return number + {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t", None: "b"}[unit]


def docker_run_args(pod: dict[str, Any], container: dict[str, Any], host_paths: dict[str, Path]) -> list[str]:
    """`docker run` options for one container of a rendered pod spec, as the kubelet runs it:
    command, env, user and groups, dropped capabilities, memory limit and every volume mount.
    `host_paths` maps a volume name (a claim, a ConfigMap) to the host folder that plays it."""
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})
    args = ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    if "fsGroup" in pod_security:
        args += ["--group-add", str(pod_security["fsGroup"])]
    for capability in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", _docker_size(limits["memory"])]
    for variable in container.get("env", []):
        value = variable.get("value")
        field = (variable.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if value is None and field:
            value = f"container-test-{field}"  # the downward API (the Job's uid): a stand-in value
        if value is None:
            raise ValueError(f"env {variable['name']}: only literal and fieldRef values can be replayed here")
        args += ["--env", f"{variable['name']}={value}"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume, target = volumes[mount["name"]], mount["mountPath"]
        read_only = ",readonly" if mount.get("readOnly") else ""
        if "emptyDir" in volume:
            empty = volume["emptyDir"]
            if target == "/dev/shm":
                args += ["--shm-size", _docker_size(empty.get("sizeLimit", "64Mi"))]
            else:  # an empty, writable folder whatever uid runs
                args += ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777"]
        else:
            args += ["--mount", f"type=bind,source={host_paths[mount['name']]},destination={target}{read_only}"]
    command = container["command"]
    return [*args, "--entrypoint", command[0], container["image"], *command[1:]]
