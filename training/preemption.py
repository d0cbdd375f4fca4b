"""SIGTERM / SIGUSR1 → checkpoint at the current step → exit with EXIT_PREEMPTED.

Slurm sends SIGUSR1 (`--signal`) before the time limit or at preemption and SIGTERM on
scancel/requeue; Kubernetes sends SIGTERM when it evicts a pod. Before training starts there is
nothing new to save, so the signal stops the job at once; during training it stops the loop at
the next optimizer-step boundary, after a checkpoint.

Only the first signal counts. Once the job is stopping, every later SIGTERM, SIGUSR1 or SIGINT
is absorbed: Slurm sends USR1 and then TERM (to every process of the step, and srun and
training.launch forward them again), and none of them may cut the checkpoint short or turn
exit 75 into a death by signal, which would leave the job without its requeue.
"""

from __future__ import annotations

import signal
import sys

from transformers import TrainerCallback

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Absorbed once stopping (SIGINT keeps its default until then: Ctrl-C on a bare training.sft).
ABSORBED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(BaseException):
    """Raised by a signal that arrives before training starts. A BaseException, like
    KeyboardInterrupt, so library code's `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class PreemptionCallback(TrainerCallback):
    """Installs the handlers; asks the Trainer to save and stop once a signal arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None
        # False until training starts (a signal stops the job at once); stays True after it
        # ends, so a signal during the final adapter save does not interrupt that save.
        self.training = False

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._handle)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            _say(f"got {signal.Signals(signum).name} while stopping: ignored, the checkpoint comes first")
            return
        self._stopping(signum)
        if not self.training:
            raise Preempted(signum)
        _say(f"got {signal.Signals(signum).name}: saving a checkpoint after the current step")

    def _stopping(self, signum: int) -> None:
        self.signum = signum
        for sig in ABSORBED_SIGNALS:
            signal.signal(sig, self._handle)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if self.signum is not None:
            raise Preempted(self.signum)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_signalled(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_rank_signalled(self, args) -> bool:
        # Every rank must stop at the same step or DDP hangs in the next all-reduce.
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum is not None
        flag = torch.tensor([1 if self.signum else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self._stopping(signal.SIGTERM)
        return bool(flag.item())


def _say(message: str) -> None:
    try:
        print(f"[qlaunch] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # never let a closed log stream turn a preemption into a crash
