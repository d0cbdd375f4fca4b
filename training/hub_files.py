"""A prefetched run reads the hub offline: the job's first step (before the model loads).

`qlaunch prefetch` pinned the run's hub repos (run.yaml `hub_pins`) and downloaded them into the
shared cache; the job points huggingface_hub/transformers/datasets at that cache in offline mode
(the backends set the same variables; a job started by hand gets them here too), then checks
that every pinned file is there, so a missing one is one clear error naming repo, revision and
file instead of a connection error from deep inside from_pretrained on a node without internet.
"""

from __future__ import annotations

import os

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.hub import hub_cache_dir, missing_files, offline_env

from .entrypoint import log


def apply_offline_env(run: RunConfig) -> None:
    """The job's first step: before transformers/huggingface_hub are imported (they read these
    variables at import time)."""
    os.environ.update(offline_env(run))


def check_prefetched(run: RunConfig) -> None:
    """Every pinned file in the cache, or one ConfigError naming repo, revision and file."""
    for pin in run.hub_pins:
        missing = missing_files(run, pin)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(
                f"{pin.key}: {pin.repo_id} at revision {pin.revision}: file {missing[0]!r}{more} is not "
                f"in the hub cache {hub_cache_dir(run)}, and this job runs offline (HF_HUB_OFFLINE=1). "
                "Run `qlaunch prefetch EXPERIMENT` on a machine that reaches the hub, then start the run again"
            )
    if run.hub_pins:
        pinned = ", ".join(f"{pin.repo_id}@{pin.revision[:12]}" for pin in run.hub_pins)
        log(f"hub repos pinned by qlaunch prefetch, read offline from {hub_cache_dir(run)}: {pinned}")
