"""The asha rung ledger's layout and readers (part of the launcher ↔ job contract): the trainer
writes it (training/asha.py), `status` and `report` read it. Pure Python, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .storage import read_json

LEDGER_DIR = "asha"  # <storage root>/<experiment>/asha/rung-<k>/<run id>.json: {value, time, overrides}
DECISIONS_FILE = "asha.json"  # <run dir>/asha.json: {"decisions": {rung: Decision fields}}


def ledger_dir(experiment_folder: Path) -> Path:
    return Path(experiment_folder) / LEDGER_DIR


def rung_entries(experiment_folder: Path, rung: int) -> dict[str, dict[str, Any]]:
    """run id → what it recorded at this rung (value, time, overrides), for every run so far."""
    entries = {}
    for path in (ledger_dir(experiment_folder) / f"rung-{rung}").glob("*.json"):
        data = read_json(path) or {}
        if isinstance(data.get("value"), (int, float)):
            entries[path.stem] = data
    return entries


def rung_results(experiment_folder: Path, rung: int) -> dict[str, float]:
    """run id → value recorded at this rung by every run of the grid so far."""
    return {run_id: float(entry["value"]) for run_id, entry in rung_entries(experiment_folder, rung).items()}


def read_ledger(experiment_folder: Path) -> dict[int, dict[str, float]]:
    """rung → run id → value, every rung recorded so far."""
    rungs = {}
    for folder in ledger_dir(experiment_folder).glob("rung-*"):
        suffix = folder.name.split("-", 1)[1]
        if suffix.isdigit():
            rungs[int(suffix)] = rung_results(experiment_folder, int(suffix))
    return dict(sorted(rungs.items()))


def run_decisions(run_dir: Path) -> dict[int, dict[str, Any]]:
    """rung → the decision the run recorded there (rank, competitors, value, prune...)."""
    data = read_json(Path(run_dir) / DECISIONS_FILE) or {}
    return {int(k): v for k, v in (data.get("decisions") or {}).items() if str(k).isdigit()}


def pruned_decision(metrics_file: Path) -> dict[str, Any] | None:
    """The asha decision that stopped a finished run (its metrics.json says so), else None."""
    pruned = (read_json(Path(metrics_file)) or {}).get("pruned")
    return pruned if isinstance(pruned, dict) else None


def pruned_text(pruned: dict[str, Any]) -> str:
    """`pruned @ rung 1 (eval_loss 2.3011, rank 3/4)`: where asha stopped the run, and why."""
    return (
        f"pruned @ rung {pruned.get('rung')} ({pruned.get('metric', 'eval_loss')} "
        f"{float(pruned.get('value', 'nan')):.4f}, rank {pruned.get('rank')}/{pruned.get('competitors')})"
    )
