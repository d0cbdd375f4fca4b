"""The worker's stop request, from its first instant: standard library only, so that
`training.sft` installs it before it imports anything slow.

A worker starts with the stop signals ignored (training.launch starts accelerate that way, so that
accelerate and torchrun cannot be killed by them), and until it installs its own handlers a
signal falls on the floor. So the launcher writes the request into a file (`STOP_FILE_ENV`) before
it signals, and the worker reads that file right after installing its handlers: a request that
came before the handlers is found in the file, one that comes after reaches the handler. Either
way it is never lost.

What a request does depends on the phase (README, "How resume works"):
  - before training is armed (config, input checks, imports): recorded; `arm()` then stops;
  - armed, before the first step (model loading, trainer setup): `Preempted` at once;
  - training: the trainer checkpoints after the current step and exits 75 (PreemptionCallback);
  - stopping or after training (final save): absorbed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Set by training.launch for its workers: the file a stop request is written to before the
# signal is sent. Both sides are in training/ (the same image), so it is no wire protocol.
STOP_FILE_ENV = "QLAUNCH_STOP_REQUEST_FILE"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Absorbed once stopping (SIGINT keeps its default until then: Ctrl-C on a bare training.sft).
ABSORBED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(BaseException):
    """Raised by a stop request before training starts. A BaseException, like
    KeyboardInterrupt, so library code's `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def write_request(path: str | os.PathLike, signum: int) -> None:
    """The launcher's side: the request, complete before any worker can read it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(signal.Signals(signum).name)
    os.replace(partial, path)


def read_request(env: dict[str, str] | None = None) -> int | None:
    """The signal a request file names, if the launcher wrote one."""
    name = (env if env is not None else os.environ).get(STOP_FILE_ENV)
    if not name:
        return None
    try:
        text = Path(name).read_text().strip()
    except OSError:
        return None
    try:
        return int(signal.Signals[text])
    except KeyError:
        return int(signal.SIGTERM)


class StopRequest:
    """The worker's handler state: the first request counts, later ones are absorbed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False  # past the cheap start-up checks: a request raises Preempted
        # True once training started; stays True after it ends, so that a request during the
        # final adapter save does not interrupt that save.
        self.training = False

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def install(self) -> "StopRequest":
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._handle)
        # After the handlers: a request sent before them is in the file (written before the
        # signal), one sent after them reaches _handle.
        requested = read_request()
        if requested is not None and self.signum is None:
            _say(f"a stop request ({signal.Signals(requested).name}) came while this worker started: stopping")
            self.stopping(requested)
        return self

    def arm(self) -> None:
        """From here a request stops the worker at once; one already received does so now."""
        self.armed = True
        if self.signum is not None and not self.training:
            raise Preempted(self.signum)

    def stopping(self, signum: int) -> None:
        self.signum = signum
        for sig in ABSORBED_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            _say(f"got {signal.Signals(signum).name} while stopping: ignored, the checkpoint comes first")
            return
        self.stopping(signum)
        if not self.armed:
            return  # arm() stops the worker, after the checks that cannot be interrupted
        if not self.training:
            raise Preempted(signum)
        _say(f"got {signal.Signals(signum).name}: saving a checkpoint after the current step")


def _say(message: str) -> None:
    try:
        print(f"[qlaunch] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # never let a closed log stream turn a preemption into a crash
