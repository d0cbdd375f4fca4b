"""Which parts of a run come from the Hugging Face hub, where their files are cached, and the
pins `qlaunch prefetch` records (no network here: launcher.prefetch talks to the hub).

The shared cache is `<storage root>/.cache/huggingface` (the `HF_HOME` the Kubernetes manifests
already give pods), or `environment.variables.HF_HOME` / `HF_HUB_CACHE` when the experiment sets
one: the place every job of the grid can read, whatever the submitting shell has in `HF_HOME`.

Pins live in two places: `<storage root>/<experiment>/pins.json` (the experiment's record, one
entry per distinct repo and requested revision, reused by every later submit so a resumed or
resubmitted run reads the same commit) and each run's `run.yaml` (`model.revision`,
`model.tokenizer_revision`, `dataset.revision`, `hub_pins`), which is what a job starts from.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import HubPin, RunConfig
from .errors import ConfigError
from .storage import atomic_write_text

PACKAGE_SCHEME = "package:"
DEFAULT_REVISION = "main"
PINS_FILE = "pins.json"
# Suffixes the hub's dataset loaders treat as local files (training.formatting.LOCAL_FORMATS).
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class HubRef:
    """One hub repo a run reads, as the experiment file names it."""

    key: str  # model.name_or_path | model.tokenizer | dataset.path
    repo_id: str
    repo_type: str  # "model" | "dataset"
    requested: str | None  # the revision as written; None means the default branch

    @property
    def pin_key(self) -> str:
        return f"{self.repo_type}:{self.repo_id}@{self.requested or DEFAULT_REVISION}"


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1


def is_hub_model(value: str, run: RunConfig) -> bool:
    """The same test training.model_source.resolve_location applies at run time."""
    if value.startswith(PACKAGE_SCHEME) or run.resolve_path(value).exists():
        return False
    return not _looks_local(value)


def is_hub_dataset(value: str, run: RunConfig) -> bool:
    """The same test training.formatting.load_records applies at run time."""
    if run.resolve_path(value).exists() or Path(value).suffix.lower() in LOCAL_DATA_SUFFIXES:
        return False
    return not value.startswith(("/", "./", "../", "~"))


def hub_refs(run: RunConfig) -> list[HubRef]:
    """The model, tokenizer (when it is another repo) and dataset of a run that live on the hub."""
    refs = []
    model = run.model
    if is_hub_model(model.name_or_path, run):
        refs.append(HubRef("model.name_or_path", model.name_or_path, "model", model.revision))
    if model.tokenizer and model.tokenizer != model.name_or_path and is_hub_model(model.tokenizer, run):
        refs.append(HubRef("model.tokenizer", model.tokenizer, "model", model.tokenizer_revision))
    if is_hub_dataset(run.dataset.path, run):
        refs.append(HubRef("dataset.path", run.dataset.path, "dataset", run.dataset.revision))
    return refs


def read_hf_token(run: RunConfig) -> str | None:
    """The HF token (model.hf_token_file, else $model.hf_token_env), read when needed and never
    written anywhere (nor printed): by the job at run time, by prefetch on the submitting machine."""
    if run.model.hf_token_file:
        path = run.resolve_path(run.model.hf_token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"model.hf_token_file: cannot read {path}: {exc.strerror}") from None
        return token or None
    return os.environ.get(run.model.hf_token_env) or None


# ---- the shared cache and the job's environment -----------------------------------------------
def hf_home(run: RunConfig) -> Path:
    configured = run.environment.variables.get("HF_HOME")
    if configured:
        return run.resolve_path(configured)
    return Path(run.run_dir).parents[1] / ".cache" / "huggingface"


def hub_cache_dir(run: RunConfig) -> Path:
    configured = run.environment.variables.get("HF_HUB_CACHE")
    return run.resolve_path(configured) if configured else hf_home(run) / "hub"


def offline_env(run: RunConfig) -> dict[str, str]:
    """Environment variables of a job whose hub files were prefetched: the shared cache, and
    the hub and datasets offline modes (a node without internet trains). Empty for a run that
    was not prefetched (`--no-prefetch`, Kubernetes): its job reads the hub as before."""
    if not run.hub_pins:
        return {}
    env = {"HF_HOME": str(hf_home(run)), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if run.environment.variables.get("HF_HUB_CACHE"):
        env["HF_HUB_CACHE"] = str(hub_cache_dir(run))
    return env


def snapshot_dir(run: RunConfig, pin: HubPin) -> Path:
    """Where huggingface_hub's cache keeps a pinned repo's files (its documented layout)."""
    folder = f"{pin.repo_type}s--" + pin.repo_id.replace("/", "--")
    return hub_cache_dir(run) / folder / "snapshots" / pin.revision


def pin_for(run: RunConfig, key: str) -> HubPin | None:
    return next((pin for pin in run.hub_pins if pin.key == key), None)


def missing_files(run: RunConfig, pin: HubPin) -> list[str]:
    snapshot = snapshot_dir(run, pin)
    return [name for name in pin.files if not (snapshot / name).is_file()]


# ---- the experiment's record ----------------------------------------------------------------
def pins_path(storage_root: Path, experiment: str) -> Path:
    return Path(storage_root) / experiment / PINS_FILE


def read_pins(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable pins record ({exc}); delete it to resolve again") from None
    return data.get("pins", {}) if isinstance(data, dict) else {}


def write_pins(path: Path, experiment: str, pins: dict[str, dict]) -> None:
    data = {"experiment": experiment, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pins": pins}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def pinned_run(run: RunConfig, pins: dict[str, dict]) -> RunConfig:
    """The run with its hub repos at their pinned commits (same run id: the experiment as
    written did not change, only when it was resolved)."""
    hub_pins = []
    update_model: dict = {}
    update_dataset: dict = {}
    for ref in hub_refs(run):
        record = pins[ref.pin_key]
        pin = HubPin(
            key=ref.key,
            repo_id=ref.repo_id,
            repo_type=ref.repo_type,
            requested=ref.requested,
            revision=record["revision"],
            files=record["files"],
        )
        hub_pins.append(pin)
        if ref.key == "model.name_or_path":
            update_model["revision"] = pin.revision
        elif ref.key == "model.tokenizer":
            update_model["tokenizer_revision"] = pin.revision
        else:
            update_dataset["revision"] = pin.revision
    return run.model_copy(
        update={
            "model": run.model.model_copy(update=update_model),
            "dataset": run.dataset.model_copy(update=update_dataset),
            "hub_pins": hub_pins,
        }
    )
