"""The local backend: each job a subprocess on this host, on the GPUs its pool gives it (or the CPU).

A job is spawned without a shell in its own session (its own process group); a reader thread per job
puts its merged stdout+stderr lines on one queue, which `poll` hands to the run loop as events.

No child outlives the launcher:
  * the loop forwards SIGINT/SIGTERM to every child's process group (grandchildren included), then
    SIGKILL after its grace period;
  * when a worker exits, what is left of its process group is killed, so its leftovers cannot hold
    a GPU whose lease has just been released;
  * each child asks the kernel for SIGKILL when the launcher dies (PR_SET_PDEATHSIG), which covers
    a SIGKILLed launcher. Grandchildren then end on their own when their parent dies (torch's
    DataLoader workers watch for it) or on their next write to the closed log pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from recipe_runner.backends.base import Event, Exited, Line, Started
from recipe_runner.backends.gpu_pool import GpuPool
from recipe_runner.host.gpus import cpu_list_text
from recipe_runner.host.leases import Lease
from recipe_runner.planning.jobs import JobSpec, bind_gpus

PR_SET_PDEATHSIG = 1
MAX_LINES_A_POLL = 5000  # bounded, so the table still redraws under a flood of lines
KILL_WAIT_S = 5.0


@dataclass
class _Child:
    spec: JobSpec
    proc: subprocess.Popen[bytes]
    leases: list[Lease] = field(default_factory=list)
    reader: threading.Thread | None = None


class LocalBackend:
    """Subprocesses on this host; `pool` places GPU jobs (None: CPU jobs, all at once, or at most
    `max_running` at once: a search's many trials share the cores as a launch's recipes would)."""

    def __init__(self, pool: GpuPool | None, max_running: int | None = None) -> None:
        self.pool, self.max_running = pool, max_running
        self.children: dict[str, _Child] = {}
        self.lines: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self.events: list[Event] = []

    def describe(self) -> str:
        return "the CPU" if self.pool is None else ", ".join(gpu.label for gpu in self.pool.gpus)

    def open(self, specs: list[JobSpec]) -> list[str]:
        return []

    def waiting_for(self) -> str:
        if self.pool is None:
            return f"its turn ({self.max_running} jobs run at once on the CPU)" if self.max_running else ""
        return f"a GPU ({self.pool.waiting_for})" if self.pool.waiting_for else ""

    def start(self, spec: JobSpec) -> bool:
        leases: list[Lease] = []
        shared = False
        if self.pool is None and self.max_running is not None and len(self.children) >= self.max_running:
            return False
        if self.pool is not None:
            taken = self.pool.take(spec)
            if taken is None:
                return False
            gpus, leases, shared = taken
            spec = bind_gpus(spec, gpus, self.pool.cores)
        header = [f"# command: {shlex.join(spec.argv)}", f"# env: {shlex.join(_env_words(spec.env))}"]
        if spec.cpus:
            header.append(f"# cores: {cpu_list_text(spec.cpus)}")
        try:
            proc = spawn(spec.argv, spec.env, spec.cpus)
        except OSError as error:
            for lease in leases:
                lease.release()
            self.events.append(Exited(spec.key, None, f"could not start {spec.argv[0]!r}: {error}"))
            return True
        child = _Child(spec, proc, leases)
        child.reader = threading.Thread(target=_pump, args=(spec.key, proc.stdout, self.lines), daemon=True)
        child.reader.start()
        self.children[spec.key] = child
        self.events.append(Started(spec.key, spec, proc.pid, f"pid {proc.pid}", tuple(header), shared))
        return True

    def poll(self, timeout: float) -> list[Event]:
        events, self.events = self.events, []
        self._drain(events, 0.0 if events else timeout)
        for key, child in list(self.children.items()):
            if child.proc.poll() is not None:
                events += self._finish(key, child)
        return events

    def _drain(self, events: list[Event], timeout: float) -> None:
        try:
            first = self.lines.get(timeout=timeout) if timeout > 0 else self.lines.get_nowait()
        except queue.Empty:
            return
        pending = [first]
        with contextlib.suppress(queue.Empty):
            for _ in range(MAX_LINES_A_POLL):
                pending.append(self.lines.get_nowait())
        events += [Line(key, text) for key, text in pending if text is not None]  # None: a stream's end

    def _finish(self, key: str, child: _Child) -> list[Event]:
        _signal_group(child.proc, signal.SIGKILL)  # leftovers of a finished worker
        if child.reader is not None:
            child.reader.join(timeout=2.0)
        events: list[Event] = []
        self._drain(events, 0.0)
        for lease in child.leases:
            lease.release()
        del self.children[key]
        return [*events, Exited(key, child.proc.returncode)]

    def signal(self, key: str, signum: int) -> None:
        child = self.children.get(key)
        if child is not None:
            _signal_group(child.proc, signum)

    def cancel(self, key: str) -> None:
        """Nothing waits inside this backend: a job not started is only the loop's."""

    def close(self) -> None:
        for child in self.children.values():
            _signal_group(child.proc, signal.SIGKILL)
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=KILL_WAIT_S)


def spawn(argv: Sequence[str], env: dict[str, str], cpus: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start one worker: no shell, its own session, stdout+stderr in one pipe, on `cpus` (() = any core)."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,  # a child must not read (or stop on) the terminal
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,  # its own process group: signals reach its grandchildren too
        preexec_fn=_die_with_parent_hook(),  # see _die_with_parent_hook
    )
    if cpus:
        # Set from here, not in preexec_fn (no allocation between fork and exec). The child is still
        # starting Python, single-threaded, so every thread it makes later (torch's, the loader's) inherits.
        with contextlib.suppress(OSError):  # a core taken away meanwhile (cgroup): it runs unpinned
            os.sched_setaffinity(proc.pid, cpus)
    return proc


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when this process dies.

    Runs in the child between fork and exec, where other threads' locks may be held: it only
    calls a C function resolved beforehand. PDEATHSIG fires when the *thread* that forked dies,
    so jobs are spawned from the main thread only.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


@functools.cache
def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    # The child is its group's leader (start_new_session), so its pid is the group id. The group
    # can outlive the leader, so this still reaches grandchildren after the worker has exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _pump(key: str, stream: IO[bytes] | None, lines: queue.SimpleQueue[tuple[str, str | None]]) -> None:
    """Reader thread: whole lines from a child's pipe onto the shared queue, None at the end."""
    assert stream is not None
    with stream:
        for raw in iter(stream.readline, b""):
            lines.put((key, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
    lines.put((key, None))


def _env_words(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in sorted(env.items())]
