"""One writer per run folder: an advisory lock that names its holder and dies with it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from runner.errors import RunError

LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` while the run writes there.

    flock is released by the kernel when its process dies, even by kill -9, so a lock file
    left behind by a dead run is simply taken over; the pid in the file is only for the message.
    """
    import fcntl  # POSIX only; nnopt's supported platforms are Linux and macOS

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"another nnopt run (pid {holder}) is writing {run_dir}",
                           "wait for it to finish, stop it, or give this run another output folder with -O") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
