"""`qlaunch prefetch` (and the first step of `qlaunch submit`/`run`): every hub model, tokenizer
and dataset of a grid resolved to a commit and downloaded once into the shared cache, on the
machine that submits, before any job starts.

- Once per distinct (repo, requested revision) for the whole grid, whatever the number of runs.
- Resolved once: the commit goes into `<storage>/<experiment>/pins.json` and every later submit
  of the experiment (a resume, a resubmit, a grid grown by a value) reuses it, so runs of one
  grid never train on different bytes; `qlaunch status --check-hub` says when the hub moved on.
- Resumable: `snapshot_download` continues a file after a dropped connection (HTTP Range) and
  skips the files already in the cache, so a killed prefetch fetches only what it had not
  finished (a file in flight restarts: huggingface_hub keeps partial files per process); a
  pinned repo whose files are all in the cache costs no network call at all.
- The token (model.hf_token_env / hf_token_file, read as the job reads them, else the hub
  client's own login) is passed to the client only; it is never written or printed.

huggingface_hub is imported lazily (it is light, but the CLI imports this module on every call).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .grid import Plan
from .job.config import HubPin, RunConfig
from .job.errors import QlaunchError
from .job.hub import (
    DEFAULT_REVISION,
    HubRef,
    hub_cache_dir,
    hub_refs,
    pinned_run,
    pins_path,
    read_hf_token,
    read_pins,
    snapshot_dir,
    write_pins,
)

# Weight formats a repo may carry next to each other; a job loads one of them.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".ot",
    ".tflite",
    ".npz",
    ".mlmodel",
    ".pb",
)


class PrefetchError(QlaunchError):
    """The hub refused or could not be reached; nothing was started."""

    exit_code = 2


@dataclass
class Fetched:
    ref: HubRef
    revision: str
    files: list[str]
    bytes: int | None
    downloaded: bool  # False: every file was already in the cache


def select_files(ref: HubRef, run: RunConfig, siblings: list[tuple[str, int | None]]) -> list[str]:
    """The files of a repo the job reads: a dataset whole; a model's configs and tokenizer, plus
    one weight format (the GGUF named by model.gguf_file, else top-level safetensors, else .bin;
    none for `model.init: random`). Llama-2 repos ship both formats: this halves the download."""
    names = [name for name, _ in siblings]
    if ref.repo_type == "dataset":
        return sorted(names)
    other = [n for n in names if not n.lower().endswith(WEIGHT_SUFFIXES)]
    if ref.key != "model.name_or_path" or run.model.init == "random":
        return sorted(other)
    top = [n for n in names if "/" not in n]
    if run.model.gguf_file:
        weights = [n for n in names if n == run.model.gguf_file]
        if not weights:
            ggufs = ", ".join(n for n in names if n.endswith(".gguf")) or "none"
            raise PrefetchError(
                f"model.gguf_file: no {run.model.gguf_file!r} in {ref.repo_id} (its GGUF files: {ggufs})"
            )
    else:
        weights = [n for n in top if n.endswith(".safetensors")] or [n for n in top if n.endswith(".bin")]
    return sorted(other + weights)


def _hub_error(ref: HubRef, run: RunConfig, exc: Exception, token: str | None) -> PrefetchError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{ref.key}: {ref.repo_id}"
    token_source = (
        f"model.hf_token_file ({run.model.hf_token_file})"
        if run.model.hf_token_file
        else f"${run.model.hf_token_env} (model.hf_token_env)"
    )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        if token is None and status != 403:  # 403: the client sent its stored login's token
            return PrefetchError(
                f"{where} is gated: the hub refused it without a token (HTTP {status}). Set "
                f"{token_source} on this machine to a token of an account that accepted the "
                "model's license on its hub page"
            )
        if token is None:
            token_source = "your huggingface_hub login"
        return PrefetchError(
            f"{where} is gated and the hub refused the token from {token_source} (HTTP {status}): "
            "its account has not been granted access (accept the license on the model's hub page)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return PrefetchError(f"{where}: the hub has no revision {ref.requested or DEFAULT_REVISION!r}")
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if token else f"; if it is private, set {token_source}"
        return PrefetchError(f"{where}: no such {ref.repo_type} repo on the hub (HTTP {status}){hint}")
    if isinstance(exc, OfflineModeIsEnabled):
        return PrefetchError(
            f"{where}: not pinned and not in the cache, and HF_HUB_OFFLINE is set on this machine: "
            "prefetch where the hub can be reached"
        )
    if isinstance(exc, HfHubHTTPError):
        return PrefetchError(f"{where}: the hub answered HTTP {status}")
    reason = str(exc).replace(token, "***") if token else str(exc)
    return PrefetchError(
        f"{where}: cannot reach the hub at {constants.ENDPOINT} ({type(exc).__name__}: {reason}). "
        "Prefetch on a machine with internet, or submit with --no-prefetch (each job then "
        "downloads for itself)"
    )


def _fetch(ref: HubRef, run: RunConfig, record: dict | None, cache: Path) -> Fetched:
    from huggingface_hub import HfApi, snapshot_download

    token = read_hf_token(run)
    try:
        if record is None:
            info = (HfApi().model_info if ref.repo_type == "model" else HfApi().dataset_info)(
                ref.repo_id, revision=ref.requested or DEFAULT_REVISION, files_metadata=True, token=token
            )
            siblings = [(s.rfilename, s.size) for s in info.siblings or []]
            files = select_files(ref, run, siblings)
            size = sum(s or 0 for name, s in siblings if name in files)
            revision = info.sha
        else:
            revision, files, size = record["revision"], record["files"], record.get("bytes")
        pin = HubPin(key=ref.key, repo_id=ref.repo_id, repo_type=ref.repo_type, revision=revision, files=files)
        if all((snapshot_dir(run, pin) / name).is_file() for name in files):
            return Fetched(ref, revision, files, size, downloaded=False)
        # A commit hash as revision: snapshot_download resolves nothing and writes no refs/main,
        # so the cache holds exactly the pinned commit. Partial files resume.
        snapshot_download(
            ref.repo_id,
            repo_type=ref.repo_type,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=files,
            token=token,
        )
    except QlaunchError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear line
        raise _hub_error(ref, run, exc, token) from None
    return Fetched(ref, revision, files, size, downloaded=True)


def prefetch(p: Plan, say: Callable[[str], None] = lambda message: None, command: bool = False) -> Plan:
    """Pin and download every hub repo of the grid; the plan with each run pinned."""
    from .backends import backend_class  # the backends import the plan module, which imports this

    if command and not backend_class(p.experiment.backend).shares_storage:
        raise PrefetchError(
            "prefetch: a Kubernetes experiment's cache is on its claim, which this machine "
            "does not mount; its pods download from the hub themselves"
        )
    path = pins_path(p.storage_root, p.experiment.name)
    pins = read_pins(path)
    recorded = json.dumps(pins, sort_keys=True)
    distinct: dict[tuple[str, Path], tuple[HubRef, RunConfig]] = {}
    for run in p.runs:
        for ref in hub_refs(run):
            distinct.setdefault((ref.pin_key, hub_cache_dir(run)), (ref, run))
    for (pin_key, cache), (ref, run) in distinct.items():
        record = pins.get(pin_key)
        label = f"{ref.repo_id}@{ref.requested or DEFAULT_REVISION}"
        say(f"{'pinned' if record else 'resolving'} {ref.repo_type} {label}")
        fetched = _fetch(ref, run, record, cache)
        size = f", {fetched.bytes / 1e6:.1f} MB" if fetched.bytes else ""
        say(
            f"{label} → {fetched.revision[:12]}: {len(fetched.files)} files{size} "
            f"{'downloaded to' if fetched.downloaded else 'already in'} {cache}"
        )
        pins[pin_key] = {
            **(record or {"resolved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}),
            "repo_id": ref.repo_id,
            "repo_type": ref.repo_type,
            "requested": ref.requested,
            "revision": fetched.revision,
            "files": fetched.files,
            "bytes": fetched.bytes,
        }
    if json.dumps(pins, sort_keys=True) != recorded:
        write_pins(path, p.experiment.name, pins)
    return dataclasses.replace(p, runs=tuple(pinned_run(run, pins) for run in p.runs))


def prefetch_for_submit(p: Plan, say: Callable[[str], None]) -> Plan:
    """The prefetch step of submit/run: a failure stops the submission before anything starts."""
    try:
        return prefetch(p, say)
    except QlaunchError as exc:
        raise PrefetchError(f"{exc}. Nothing submitted.") from None


@dataclass(frozen=True)
class HubMove:
    repo: str
    requested: str
    pinned: str
    current: str


def check_hub(p: Plan) -> list[HubMove]:
    """One metadata call per pinned repo: where the requested revision points now. Changes
    nothing (the runs keep their pins)."""
    from huggingface_hub import HfApi

    pins = read_pins(pins_path(p.storage_root, p.experiment.name))
    token_run = {ref.pin_key: run for run in p.runs for ref in hub_refs(run)}
    moves = []
    for pin_key, record in sorted(pins.items()):
        run = token_run.get(pin_key)
        ref = HubRef("", record["repo_id"], record["repo_type"], record.get("requested"))
        token = read_hf_token(run) if run else None
        try:
            info = (HfApi().model_info if ref.repo_type == "model" else HfApi().dataset_info)(
                ref.repo_id, revision=ref.requested or DEFAULT_REVISION, token=token
            )
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(dataclasses.replace(ref, key="pins.json"), run or p.runs[0], exc, token) from None
        moves.append(
            HubMove(
                f"{ref.repo_type} {ref.repo_id}", ref.requested or DEFAULT_REVISION, record["revision"], info.sha or "?"
            )
        )
    return moves


def hub_check_lines(p: Plan) -> list[str]:
    """`qlaunch status --check-hub`: one line per pinned repo."""
    moves = check_hub(p)
    if not moves:
        return ["no hub repos pinned for this experiment yet (qlaunch prefetch pins them)"]
    lines = []
    for move in moves:
        if move.current == move.pinned:
            lines.append(f"{move.repo}@{move.requested}: pinned {move.pinned[:12]}, still the hub's")
        else:
            lines.append(
                f"{move.repo}@{move.requested} has moved on: pinned {move.pinned[:12]}, the hub now has "
                f"{move.current[:12]}. Runs keep the pinned revision; to train on the new one, write "
                "its revision into the experiment file (new run ids)"
            )
    return lines
