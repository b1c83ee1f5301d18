"""Per-GPU leases, so that two launchers on one host never put two recipes on one GPU.

A lease is an exclusive `flock` on `<lease dir>/<gpu uuid>.lock`, taken before a child is
spawned on that GPU and released when the child has exited. The kernel drops a flock when
its holder dies, so a lease left by a crashed or SIGKILLed launcher is free again at once;
the file itself stays (deleting lock files races with a process that has just opened one)
and holds the holder's pid and recipe, for messages only.

The directory is `$RECIPE_RUNNER_LEASE_DIR`, else `/tmp/recipe-runner-leases`: one place for
every user of the host, because GPUs are shared by users, not per user as `$XDG_RUNTIME_DIR` is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LEASE_DIR_ENV = "RECIPE_RUNNER_LEASE_DIR"
SHARED_LEASE_DIR = Path("/tmp/recipe-runner-leases")


def lease_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(LEASE_DIR_ENV) or SHARED_LEASE_DIR)


def lease_path(directory: Path, uuid: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uuid)
    return directory / f"{safe}.lock"


@dataclass
class Lease:
    """A held lease; `release()` gives it back (the kernel does too when this process dies)."""

    uuid: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # a stale note would name a holder that no longer holds
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def try_acquire(directory: Path, uuid: str, note: str) -> Lease | None:
    """Take the lease on `uuid` without blocking; None when another process holds it."""
    _make_shared_dir(directory)
    path = lease_path(directory, uuid)
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    with contextlib.suppress(OSError):  # read-only when another user created the file
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {note}\n".encode(), 0)
    return Lease(uuid, path, fd)


def holder(directory: Path, uuid: str) -> str | None:
    """Who holds the lease on `uuid` ("pid 123 recipe ..."), or None when it is free.

    Creates nothing. Probes with a shared lock, so two launchers probing at once never see
    each other as holders; a probe can make a concurrent acquire fail for an instant, and
    acquirers retry.
    """
    path = lease_path(directory, uuid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another launcher"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    # O_CLOEXEC: a child must never inherit the lease, or it would outlive its release.
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock works on a read-only fd


def _make_shared_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    if directory == SHARED_LEASE_DIR:
        with contextlib.suppress(OSError):
            directory.chmod(0o1777)  # every user's launcher must be able to create lock files
