"""Local data files of a Kubernetes run: which the pod cannot see, and where it reads them instead.

A dataset, prompts or eval file that lives on the submitting machine (a relative path, or an
absolute one outside storage.root) does not exist inside the cluster. Each such file gets a
content address (its sha256):

- small files travel in a ConfigMap per file (launcher/backends/kubernetes/manifests.py
  `_data_config_maps`, shared by every run that reads the same bytes) under the key
  `data-<sha16>-<name>`, projected read-only into /config beside the run's run.yaml;
- larger ones are staged onto the claim at `<storage.root>/.qlaunch/data/<sha16>/<name>` by
  `qlaunch submit` (launcher/backends/kubernetes/upload.py) before any Job exists.

The pod's run.yaml names those paths. They depend only on the bytes, so rendering stays pure
(`qlaunch render` shows them without a cluster), a grid shares one copy, and a changed file is a
new copy that never overwrites the one a running job reads.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ...job.config import RunConfig, SlurmConfig

CONFIG_MOUNT = "/config"
POD_HOME = "/home/qlaunch"  # an emptyDir: a writable HOME whatever uid runs the image
# Where a pod may write besides the claim at storage.root: its own HOME, shared memory and the
# image's /tmp (each gone with the pod).
POD_SCRATCH = (POD_HOME, "/dev/shm", "/tmp")
# Variables naming a folder the job creates and writes into (caches, temporary files, tracker
# output). A value outside the claim and the scratch folders fails in the pod: the image's root
# filesystem belongs to root, the pod runs as kubernetes.run_as_user.
WRITTEN_FOLDER_VARIABLES = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TMPDIR",
    "WANDB_DIR",
    "MPLCONFIGDIR",
    "HOME",
)
# A file this small goes into the ConfigMap; the whole ConfigMap stays far below the API's 1 MiB
# object limit (etcd's request limit is about 1.5 MiB, and the object carries metadata too).
CONFIGMAP_FILE_LIMIT = 256 * 1024
CONFIGMAP_DATA_LIMIT = 512 * 1024
STAGED_DIR = PurePosixPath(".qlaunch") / "data"
# The experiment keys naming a file the job reads. model.hf_token_file is not one of them: the
# token reaches a pod only through kubernetes.hf_token_secret, never as a staged copy.
FILE_KEYS = ("dataset.path", "inference.prompts_file", "inference.eval_file")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class LocalFile:
    """One distinct local file (by content) and where the pods read it."""

    source: Path  # on the submitting machine
    sha256: str
    size: int
    pod_path: str  # what the pod's run.yaml names
    config_key: str | None = None  # the ConfigMap key when it travels there; None: on the claim

    @property
    def on_claim(self) -> bool:
        return self.config_key is None


@dataclass
class RunFiles:
    """A run's local files: dotted key → LocalFile, and what its ConfigMap carries."""

    by_key: dict[str, LocalFile] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)  # ConfigMap data (UTF-8 text files)
    binary_data: dict[str, str] = field(default_factory=dict)  # base64, for other bytes

    @property
    def uploads(self) -> list[LocalFile]:
        """The files to stage onto the claim, once each."""
        seen: dict[str, LocalFile] = {}
        for local in self.by_key.values():
            if local.on_claim:
                seen.setdefault(local.pod_path, local)
        return list(seen.values())


@functools.lru_cache(maxsize=256)
def _digest(path: Path, mtime_ns: int, size: int) -> str:
    """sha256 of a file, once per (path, mtime, size) in this process: a grid of 20 runs hashes
    its dataset once."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def sha256_of(path: Path) -> str:
    stat = path.stat()
    return _digest(path.resolve(), stat.st_mtime_ns, stat.st_size)


def safe_name(name: str, limit: int = 100) -> str:
    """A file name that is a valid ConfigMap key and needs no quoting anywhere, suffix kept (the
    job's loaders pick the format by it)."""
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    stem = _UNSAFE.sub("_", stem).strip("._") or "data"
    suffix = _UNSAFE.sub("_", suffix)
    return stem[: limit - len(suffix) - 1] + (f".{suffix}" if suffix else "")


def _value(run: RunConfig, dotted: str) -> str | None:
    section, key = dotted.split(".")
    return getattr(getattr(run, section), key)


def local_source(run: RunConfig, value: str | None, storage_root: str) -> Path | None:
    """The file on this machine that `value` names, when the pods cannot see it themselves;
    None for a hub id, a path on the claim, or a file that is not here (left as it is: it may be
    on the claim already, relative to storage.root)."""
    if not value:
        return None
    given = Path(value).expanduser()
    if given.is_absolute():
        root = PurePosixPath(storage_root)
        posix = PurePosixPath(given.as_posix())
        if posix == root or root in posix.parents:
            return None  # already on the claim
    path = run.resolve_path(value)
    return path if path.is_file() else None


def local_sources(run: RunConfig, storage_root: str) -> dict[str, Path]:
    """Dotted key → the file on this machine the pods get a copy of."""
    found = {dotted: local_source(run, _value(run, dotted), storage_root) for dotted in FILE_KEYS}
    return {dotted: path for dotted, path in found.items() if path is not None}


def run_files(run: RunConfig, storage_root: str) -> RunFiles:
    """Where the pods of `run` read each local file it names (pure: depends on the bytes only)."""
    files = RunFiles()
    room = CONFIGMAP_DATA_LIMIT
    for dotted, source in local_sources(run, storage_root).items():
        sha, size = sha256_of(source), source.stat().st_size
        name = safe_name(source.name)
        key = f"data-{sha[:16]}-{name}"
        if key in files.data or key in files.binary_data:
            files.by_key[dotted] = LocalFile(source, sha, size, f"{CONFIG_MOUNT}/{key}", key)
            continue
        if size <= CONFIGMAP_FILE_LIMIT and size <= room:
            content = source.read_bytes()
            try:
                files.data[key] = _configmap_text(content)
            except ValueError:
                files.binary_data[key] = base64.b64encode(content).decode()
            room -= size
            files.by_key[dotted] = LocalFile(source, sha, size, f"{CONFIG_MOUNT}/{key}", key)
        else:
            target = PurePosixPath(storage_root) / STAGED_DIR / sha[:16] / name
            files.by_key[dotted] = LocalFile(source, sha, size, str(target))
    return files


def _configmap_text(content: bytes) -> str:
    """The bytes as a ConfigMap `data` string, or ValueError when only binaryData keeps them
    exact (not UTF-8, or characters a YAML round trip would not keep)."""
    text = content.decode("utf-8")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f\ufeff]", text):  # \r, NUL, a BOM, other controls
        raise ValueError("control characters")
    return text


def unmounted_folders(run: RunConfig, storage_root: str) -> list[tuple[str, str]]:
    """(dotted key, message) for each environment variable that points a folder the job writes
    outside what the pod can write: the claim at storage.root and the pod's scratch folders. An
    experiment written for Slurm (HF_HOME: /shared/hf-cache) would otherwise fail in the pod."""
    writable = [PurePosixPath(storage_root), *map(PurePosixPath, POD_SCRATCH)]
    found = []
    for name in WRITTEN_FOLDER_VARIABLES:
        value = run.environment.variables.get(name)
        if not value or not value.startswith("/"):
            continue
        path = PurePosixPath(os.path.normpath(value))
        if any(path == folder or folder in path.parents for folder in writable):
            continue
        if name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")):
            fix = (
                f"leave {name} unset (the pods share {PurePosixPath(storage_root) / '.cache' / 'huggingface'} "
                f"on the claim) or point it under {storage_root}"
            )
        else:
            fix = f"point it under {storage_root} (the claim) or {POD_HOME} (the pod's own)"
        found.append(
            (
                f"environment.variables.{name}",
                f"{value} is on no volume of the Kubernetes pods (the claim {run.kubernetes.pvc!r} is mounted at "
                f"{storage_root}) and uid {run.kubernetes.run_as_user} cannot create it: {fix}",
            )
        )
    return found


def pod_run(run: RunConfig, storage_root: str, files: RunFiles | None = None) -> RunConfig:
    """The run as its pods see it: relative paths resolve on the claim, and every local file is
    named where the pod finds its copy. It runs on Kubernetes whatever the file's `backend`
    says, and carries nothing of Slurm's: the pods start from kubernetes.image, so
    environment.setup (module loads, a venv) and environment.container are not theirs."""
    files = files if files is not None else run_files(run, storage_root)
    sections: dict[str, dict[str, str]] = {}
    for dotted, local in files.by_key.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = local.pod_path
    update: dict[str, object] = {"experiment_dir": storage_root, "backend": "kubernetes", "slurm": SlurmConfig()}
    for section, values in sections.items():
        update[section] = getattr(run, section).model_copy(update=values)
    update["environment"] = run.environment.model_copy(update={"setup": [], "container": None})
    return run.model_copy(update=update)


def plan_uploads(runs_files: list[RunFiles]) -> list[LocalFile]:
    """The distinct files a whole grid stages onto the claim (one copy per content)."""
    seen: dict[str, LocalFile] = {}
    for files in runs_files:
        for local in files.uploads:
            seen.setdefault(local.pod_path, local)
    return list(seen.values())


def describe_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
