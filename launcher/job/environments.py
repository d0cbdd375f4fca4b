"""Reading the per-attempt environment records (`<run dir>/attempts/<n>/environment.json`,
written by training/environment_record.py) and saying when a grid is not comparable."""

from __future__ import annotations

from pathlib import Path

from .storage import read_json

# The versions that decide what a run computes; the record has python, torch and cuda too.
LIBRARIES = ("qlaunch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
COMPARED = ("python", "torch", "cuda", *LIBRARIES)


def environment_file(run_dir: Path, attempt: int) -> Path:
    return Path(run_dir) / "attempts" / str(attempt) / "environment.json"


def attempt_records(run_dir: Path) -> list[dict]:
    """Every attempt's record of one run, in attempt order."""
    folder = Path(run_dir) / "attempts"
    if not folder.is_dir():
        return []
    numbered = sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit())
    return [record for _, p in numbered if (record := read_json(p / "environment.json"))]


def _signature(record: dict) -> tuple:
    versions = record.get("versions") or {}
    return tuple((name, versions.get(name)) for name in COMPARED)


def version_mismatches(runs: dict[str, list[dict]]) -> list[str]:
    """Warnings, one per library whose version differs across the grid's attempts ({run id:
    attempt records}); empty when every attempt ran on the same versions."""
    seen: dict[str, dict[str | None, set[str]]] = {}
    for run_id, records in runs.items():
        for record in records:
            for name, version in _signature(record):
                seen.setdefault(name, {}).setdefault(version, set()).add(run_id)
    warnings = []
    for name in COMPARED:
        versions = seen.get(name, {})
        if len(versions) > 1:
            parts = ", ".join(
                f"{version or 'none'} ({', '.join(sorted(ids))})"
                for version, ids in sorted(versions.items(), key=lambda kv: str(kv[0]))
            )
            warnings.append(f"{name} differs across the grid: {parts}")
    return warnings
