"""The one list of backends: names, aliases and where each lives. A new backend is a folder (or
module) here plus one line in `REGISTRY`; the experiment file's `backend:`, the CLI's `--backend`
and every ability check read this list.

Each module is imported only when used: `qlaunch status` on a laptop should not pay for the
kubernetes client, and a login node may not have it at all.
"""

from __future__ import annotations

import importlib

from ..job.errors import ConfigError
from .base import Backend, RunStatus, State, Submission, SubmitReport

# name → "module:class"
REGISTRY = {
    "local": "launcher.backends.local:LocalBackend",
    "slurm": "launcher.backends.slurm.backend:SlurmBackend",
    "kubernetes": "launcher.backends.kubernetes.backend:KubernetesBackend",
}
ALIASES = {"k8s": "kubernetes", "kube": "kubernetes"}


def names() -> list[str]:
    """Every name `--backend` and `backend:` accept, aliases included."""
    return [*REGISTRY, *ALIASES]


def describe() -> str:
    aliases = ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items())
    return f"choose from {', '.join(REGISTRY)}" + (f"; aliases: {aliases}" if aliases else "")


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r} ({describe()})")
    return name


def backend_class(name: str) -> type[Backend]:
    """The class, for its declared abilities (`shares_storage`, …): nothing is connected."""
    module_name, class_name = REGISTRY[canonical(name)].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(name: str, **target: str | None) -> Backend:
    """A backend ready to use; `target` (kubeconfig, context) for those that talk to an API."""
    return backend_class(name).connect(**target)


__all__ = [
    "Backend",
    "RunStatus",
    "State",
    "Submission",
    "SubmitReport",
    "backend_class",
    "canonical",
    "get_backend",
    "names",
]
