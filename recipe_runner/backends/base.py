"""What a backend is: where jobs run. Start a job, hear what it prints and how it ends, signal it, let it go.

The run loop (`backends/loop.py`) holds every rule about jobs, the same for each backend: the queue and
start order, OOM retries, hung jobs, a lost node's retry, signals and their grace period, summary.json
kept true while running. A backend only does what the rules decide, and reports what happened as events.
Two implement it: `local.py` (subprocesses on this host, GPUs by leases) and `ray.py` (Ray actors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from recipe_runner.planning.jobs import JobSpec


@dataclass(frozen=True)
class Started:
    """The job's worker runs: `spec` is the job as started (bound to its GPUs), `header` opens its log."""

    key: str
    spec: JobSpec
    pid: int | None
    where: str  # "pid 123" / "on node (ip), GPU 0"
    header: tuple[str, ...] = ()
    shared_gpu: bool = False  # placed beside other jobs on one of its GPUs (an OOM then retries it alone)


@dataclass(frozen=True)
class Line:
    key: str
    text: str


@dataclass(frozen=True)
class Exited:
    """The worker ended with `code`; None when it never ran (could not start) or its end is unknown."""

    key: str
    code: int | None
    why: str = ""  # said when there is no code


@dataclass(frozen=True)
class Lost:
    """The job's node or actor went away: the loop may run it again."""

    key: str
    why: str
    where: str = ""  # " on host (ip)", when known


Event = Started | Line | Exited | Lost


class Backend(Protocol):
    """Where jobs run. Each call returns at once, except `poll`, which waits up to `timeout` seconds."""

    def describe(self) -> str:
        """Where the jobs go, for the launch's first line ("the CPU", "gpu0, gpu1", "the Ray cluster at")."""

    def open(self, specs: list[JobSpec]) -> list[str]:
        """Get ready to run these jobs; notes for the user (the cluster's size, a job no node can take)."""

    def start(self, spec: JobSpec) -> bool:
        """Start (or submit) the job; False when there is no room for it now (the loop asks again later).
        What follows comes as events: Started, then Lines, then Exited (or Lost)."""

    def waiting_for(self) -> str:
        """What the last `start` that found no room waits for, for the user ("a GPU (gpu0 busy: ...)")."""

    def poll(self, timeout: float) -> list[Event]:
        """What happened since the last poll, waiting up to `timeout` for something."""

    def signal(self, key: str, signum: int) -> None:
        """Send `signum` to the job's worker and its children."""

    def cancel(self, key: str) -> None:
        """Drop a job submitted but not started."""

    def close(self) -> None:
        """Kill every job still running and wait a little for them; disconnect."""
