"""No worker outlives its job, and no two attempts write one run folder (standard library only).

- `die_with_parent()`: a worker whose parent (accelerate's launcher, torchrun's agent) is gone
  kills itself within half a second. torchrun starts each worker in a session of its own, so a
  SIGKILL to the job's process group does not reach them; without this they trained on as
  orphans and published checkpoints while the next attempt started in the same folder.
- `hold_rank()`: each worker holds an exclusive lock on `<run dir>/locks/rank-<rank>.lock` while it
  lives. The kernel releases it when the process dies, however it dies, so a lock that is held
  means a process still writes to the run folder; `holders()` tells the launcher which one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_DIR = "locks"
PARENT_POLL_S = 0.5


def die_with_parent(poll: float = PARENT_POLL_S) -> None:
    """SIGKILL this process as soon as its parent is gone (it was re-parented). Polling, not
    PR_SET_PDEATHSIG: that fires when the parent *thread* that forked us exits, and torchrun
    may start workers from a thread that ends before the job does."""
    parent = os.getppid()
    if parent <= 1:
        return  # started by init or a container's PID 1 itself: nothing to watch

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="qlaunch-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class Holder:
    rank: int
    pid: int
    host: str

    def describe(self) -> str:
        where = f"pid {self.pid}" if self.host == socket.gethostname() else f"pid {self.pid} on {self.host}"
        command = _command_line(self.pid) if self.host == socket.gethostname() else ""
        return f"rank {self.rank}: {where}" + (f" ({command})" if command else "")


class RunFolderBusy(Exception):
    def __init__(self, holder: Holder):
        super().__init__(holder.describe())
        self.holder = holder


def lock_path(run_root: Path, rank: int) -> Path:
    return Path(run_root) / LOCK_DIR / f"rank-{rank}.lock"


def hold_rank(run_root: Path, rank: int) -> int | None:
    """Lock this rank of the run for this process's lifetime (the fd is kept open and not
    inherited). RunFolderBusy when a live process holds it; None where the filesystem has no
    locks (then nothing is guarded, as before)."""
    path = lock_path(run_root, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd, rank)
        os.close(fd)
        raise RunFolderBusy(holder) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def holders(run_root: Path, ranks: range | list[int]) -> list[Holder]:
    """The live processes that hold these ranks' locks (an earlier attempt's workers)."""
    found = []
    for rank in ranks:
        path = lock_path(run_root, rank)
        if not path.exists():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            found.append(_read_holder(fd, rank))
        except OSError:
            pass  # no locks on this filesystem
        finally:
            os.close(fd)
    return found


def _read_holder(fd: int, rank: int) -> Holder:
    text = os.pread(fd, 256, 0).decode(errors="replace").split()
    pid = int(text[0]) if text and text[0].isdigit() else 0
    return Holder(rank, pid, text[1] if len(text) > 1 else "?")


def _command_line(pid: int) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(p.decode(errors="replace") for p in parts if p)[:200]
