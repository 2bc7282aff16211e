"""One blockcopy process per domain: an advisory lock file in the state directory.

The kernel drops a flock when its holder dies, so a ``kill -9`` never leaves a stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path
from types import TracebackType

from blockcopy.errors import DomainBusy, JournalError


class DomainLock:
    def __init__(self, state_dir: Path, domain: str, *, wait: float = 0.0) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)
        self.path = state_dir / "locks" / f"{safe}.lock"
        self.domain = domain
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            # Never through a symlink: the pid written below would truncate whatever it points to.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise JournalError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
            raise JournalError(f"the lock file {self.path} is a symbolic link; blockcopy does not follow it. "
                             "Remove it (blockcopy creates the lock file itself)") from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise DomainBusy(
                        f"domain {self.domain} is busy: blockcopy (pid {holder}) is working on it. "
                        "Wait for that command to end (Ctrl-C on a waiting copy leaves the job running), "
                        "then try again") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DomainLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
