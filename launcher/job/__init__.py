"""The contract between the launcher and its jobs: everything `training/` may import.

run.yaml's schema (config.py) and its file (experiment_file.py), the storage layout (storage.py),
progress events and exit codes (progress.py), names both sides spell the same way (protocol.py),
the checks a run's inputs get on both sides (run_checks.py, with the one local-path-or-hub-id rule),
the hub cache (hub.py), data files (data_files.py), eval metrics (metrics.py), the requeue rule
(requeue.py), the search ledger (search.py, ledger.py) and errors (errors.py).

The laptop's qlaunch and the job image can be different versions: a change here is a change of
the wire protocol between them, made on purpose. Nothing here imports torch, transformers or any
other part of the launcher (tests/test_boundaries.py).
"""

from .. import __version__

__all__ = ["__version__"]
