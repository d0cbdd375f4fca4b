"""What the job entrypoints (training.sft, training.infer, training.launch) share."""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.experiment_file import load_run_config
from launcher.job.progress import EXIT_CONFIG, EXIT_FAILED, EXIT_OK  # noqa: F401 - the entrypoints' exit codes


def load_run_or_report(value: str) -> RunConfig | None:
    """The run config named on the command line (run.yaml or its run folder); None after
    printing one clear error line, for the caller to exit with EXIT_CONFIG."""
    try:
        return load_run_config(value)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def input_errors(run: RunConfig, config_path: str, parts: tuple[str, ...]) -> list[str]:
    """The launcher's input checks, run again by the job before it loads the model (a path
    checked nowhere else, after `--skip-input-checks`): each error printed as one line."""
    from launcher.job.run_checks import check_job

    errors = [str(problem) for problem in check_job(run, config_path, parts)]
    for error in errors:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return errors


def log(message: str) -> None:
    print(f"[qlaunch] {message}", flush=True)


def scrub(text: str, secret: str | None) -> str:
    """Text for a log or an error event with the HF token blanked out."""
    return text.replace(secret, "***") if secret else text


def run_with_token(run: RunConfig, work: Callable[[], int], refusals: tuple[type[Exception], ...] = ()) -> int:
    """A job's work with the hub token read and the prefetched files checked first; every error
    one clear line (`refusals`: errors that say themselves, exit EXIT_FAILED), a crash its
    traceback; the token blanked out of either."""
    from .hub_files import check_prefetched
    from .model_source import read_hf_token

    token = None
    try:
        token = read_hf_token(run)
        check_prefetched(run)
        return work()
    except ConfigError as exc:
        print(f"error: {scrub(str(exc), token)}", file=sys.stderr)
        return EXIT_CONFIG
    except refusals as exc:
        print(f"error: {scrub(str(exc), token)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:  # noqa: BLE001 - a crash: its traceback, for the log
        print(scrub(traceback.format_exc(), token), file=sys.stderr)
        return EXIT_FAILED
