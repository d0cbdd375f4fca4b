"""A job's log holds what the job did, not the libraries' noise (issue #33, 10).

- bitsandbytes, on a CPU with AVX512-BF16, tries to fetch an optional `gemm_4bit_forward` kernel
  through the `kernels` package at import and logs a warning that ends in "pip install kernels"
  when it cannot: the first line of every CPU job's log. qlaunch never uses that kernel (it keeps
  4-bit layers on bitsandbytes' portable path on every CPU: `model_source.pin_cpu_4bit_kernel`),
  so the warning is dropped and one line says why.
- Progress bars (tqdm in datasets, transformers, huggingface_hub, the GGUF conversion) redraw
  with `\\r` and leave runs of several KB per bar in a log file. When stdout is not a terminal (a
  job's log always is a file or a pipe), they are off; a user's own setting wins.

Call `quiet_job_logs()` first thing in a job entrypoint: before bitsandbytes, datasets or
transformers is imported. Pure Python: nothing heavy imported here.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TextIO

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward"
KERNELS_NOTE = (
    "bitsandbytes: its optional AVX512-BF16 CPU kernel (package `kernels`) is not loaded: nothing to "
    "install, qlaunch does not use it (4-bit layers run on the GPU, or on bitsandbytes' portable CPU path)"
)
PROGRESS_BAR_SWITCHES = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


class _KernelsWarningFilter(logging.Filter):
    """Drops bitsandbytes' "pip install kernels" warning; says once, in qlaunch's words, why."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say = say
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(KERNELS_WARNING):
            return True
        if not self.said:
            self.said = True
            self.say(KERNELS_NOTE)
        return False


def quiet_job_logs(stream: TextIO | None = None, say: Callable[[str], None] | None = None) -> None:
    """Install the bitsandbytes filter (once per process) and, off a terminal, turn progress bars off."""
    stream = stream or sys.stdout
    if say is None:
        from .entrypoint import log as say
    logger = logging.getLogger(BNB_CPU_LOGGER)  # the same object bitsandbytes gets by __name__
    if not any(isinstance(f, _KernelsWarningFilter) for f in logger.filters):
        logger.addFilter(_KernelsWarningFilter(say))
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        for name in PROGRESS_BAR_SWITCHES:  # inherited by accelerate's workers too
            os.environ.setdefault(name, "1")
