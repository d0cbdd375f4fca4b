"""SIGTERM / SIGUSR1 → checkpoint at the current step → exit with EXIT_PREEMPTED.

Slurm sends SIGUSR1 (`--signal`) before the time limit or at preemption and SIGTERM on
scancel/requeue; Kubernetes sends SIGTERM when it evicts a pod. Before training starts there is
nothing new to save, so the signal stops the job at once; during training it stops the loop at
the next optimizer-step boundary, after a checkpoint.

The handlers themselves are training/stop_request.py's, installed in the worker's first instant
(standard library only); this callback is how the Trainer hears of them. Only the first signal
counts. Once the job is stopping, every later SIGTERM, SIGUSR1 or SIGINT is absorbed: Slurm sends
USR1 and then TERM (to every process of the step, and srun and training.launch forward them
again), and none of them may cut the checkpoint short or turn exit 75 into a death by signal,
which would leave the job without its requeue.
"""

from __future__ import annotations

import signal

from transformers import TrainerCallback

from .stop_request import Preempted, StopRequest

__all__ = ["Preempted", "PreemptionCallback"]


class PreemptionCallback(TrainerCallback):
    """Asks the Trainer to save and stop once a stop request arrived (on any rank)."""

    def __init__(self, request: StopRequest) -> None:
        self.request = request

    @property
    def signum(self) -> int | None:
        return self.request.signum

    @property
    def signal_name(self) -> str | None:
        return self.request.signal_name

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.training = True
        if self.request.signum is not None:
            raise Preempted(self.request.signum)

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
            return self.request.signum is not None
        flag = torch.tensor([1 if self.request.signum else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.request.signum is None:
            self.request.stopping(signal.SIGTERM)
        return bool(flag.item())
