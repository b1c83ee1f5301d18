"""GPU memory reservations shared by every launcher on a host: who may start how much on which GPU.

A reservation is a file `<lease dir>/<gpu uuid>.d/<pid>-<n>.res` that its launcher holds an exclusive
`flock` on while the job runs; it names the holder and the MiB reserved, or the whole GPU (an exclusive
lease: nothing else may start there). The kernel drops a flock when its holder dies, so the reservation of
a crashed or SIGKILLed launcher stops counting at once; the next reserver removes such stale files.
Taking a reservation is atomic between launchers: the reserver holds `<uuid>.lock` (a short mutex) while it
adds up the live reservations and writes its own.

`try_acquire` takes a whole GPU (one job per GPU, the rule when jobs are not packed); `reserve` takes
`mib` of a GPU whose capacity is `capacity_mib` (packing: several jobs on one GPU while their planned peaks
fit). `reservations` lists the live ones; `holder` names them for messages.

The directory is `$RECIPE_RUNNER_LEASE_DIR`, else `/tmp/recipe-runner-leases`: one place for
every user of the host, because GPUs are shared by users, not per user as `$XDG_RUNTIME_DIR` is.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

LEASE_DIR_ENV = "RECIPE_RUNNER_LEASE_DIR"
SHARED_LEASE_DIR = Path("/tmp/recipe-runner-leases")


def lease_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(LEASE_DIR_ENV) or SHARED_LEASE_DIR)


WHOLE_GPU = -1  # the MiB of an exclusive lease


@dataclass
class Lease:
    """A held reservation; `release()` gives it back (the kernel does too when this process dies)."""

    uuid: str
    path: Path
    fd: int
    mib: int = WHOLE_GPU

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still locked by us: no reserver counts it after this
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


@dataclass(frozen=True)
class Reservation:
    """A live reservation on a GPU, as another launcher (or this one) sees it."""

    note: str  # "pid 123 recipe r4-joint launch 20261130-..."
    mib: int  # WHOLE_GPU for an exclusive lease

    @property
    def exclusive(self) -> bool:
        return self.mib == WHOLE_GPU


def try_acquire(directory: Path, uuid: str, note: str) -> Lease | None:
    """The whole GPU `uuid`, without blocking; None when anyone holds any reservation on it."""
    return reserve(directory, uuid, note, WHOLE_GPU, 0)


def reserve(directory: Path, uuid: str, note: str, mib: int, capacity_mib: int) -> Lease | None:
    """`mib` of GPU `uuid` (WHOLE_GPU: all of it), if the live reservations leave room in `capacity_mib`.

    None when the GPU is held whole, or (for a whole-GPU request) when anything is reserved on it.
    """
    _make_shared_dir(directory)
    with _mutex(directory, uuid):
        live = _live(directory / _safe(uuid + ".d"), clean=True)
        if any(r.exclusive for r in live) or (mib == WHOLE_GPU and live):
            return None
        if mib != WHOLE_GPU and sum(r.mib for r in live) + mib > capacity_mib:
            return None
        return _write_reservation(directory / _safe(uuid + ".d"), uuid, note, mib)


def reservations(directory: Path, uuid: str) -> list[Reservation]:
    """The live reservations on `uuid`; creates nothing."""
    return _live(directory / _safe(uuid + ".d"), clean=False)


def holder(directory: Path, uuid: str) -> str | None:
    """Who holds reservations on `uuid` ("pid 123 recipe ..."), or None when nothing is reserved."""
    live = reservations(directory, uuid)
    return "; ".join(r.note for r in live) or None


def _write_reservation(folder: Path, uuid: str, note: str, mib: int) -> Lease:
    folder.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o1777)  # every user's launcher must be able to add its reservation
    path = folder / f"{os.getpid()}-{next(_COUNTER)}.res"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # cannot block: the file is new and we hold the GPU's mutex
    os.write(fd, f"pid {os.getpid()} {note}\n{mib}\n".encode())
    return Lease(uuid, path, fd, mib)


def _live(folder: Path, clean: bool) -> list[Reservation]:
    """Reservations whose holder still holds them; with `clean` (under the mutex) stale files go."""
    found = []
    for path in sorted(folder.glob("*.res")) if folder.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # released while we looked
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: live
                found.append(_parse(os.pread(fd, 4096, 0).decode(errors="replace")))
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            if clean:
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            os.close(fd)
    return found


def _parse(text: str) -> Reservation:
    lines = text.splitlines()
    note = lines[0] if lines else "another launcher"
    try:
        mib = int(lines[1])
    except (IndexError, ValueError):  # written by hand, or half-written: count it as the whole GPU
        mib = WHOLE_GPU
    return Reservation(note, mib)


@contextlib.contextmanager
def _mutex(directory: Path, uuid: str) -> Iterator[None]:
    fd = _open_lock_file(directory / _safe(uuid + ".lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a few file operations only
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_COUNTER = itertools.count()


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
