"""Backends by name. Each module is imported only when used: `qlaunch status` on a laptop
should not pay for the kubernetes client, and a login node may not have it at all."""

from __future__ import annotations

import importlib

from ..job.errors import ConfigError
from .base import Backend, RunStatus, State, Submission, SubmitReport

ALIASES = {"k8s": "kubernetes", "kube": "kubernetes"}
_MODULES = {
    "local": ("launcher.backends.local", "LocalBackend"),
    "slurm": ("launcher.backends.slurm.backend", "SlurmBackend"),
    "kubernetes": ("launcher.backends.kubernetes.backend", "KubernetesBackend"),
}


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _MODULES:
        raise ConfigError(f"unknown backend {name!r} (choose from local, slurm, kubernetes/k8s)")
    return name


def get_backend(name: str) -> Backend:
    module_name, class_name = _MODULES[canonical(name)]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Backend", "RunStatus", "State", "Submission", "SubmitReport", "canonical", "get_backend"]
