"""Run planned jobs as local subprocesses and watch them until every one has ended.

`run_jobs` spawns each job without a shell in its own session (its own process group), streams
its merged stdout+stderr line by line to its log file and the reporter, queues jobs until enough
GPUs of the pool are free and leased, and returns one `JobResult` per job. It is the seam a
later backend (Ray) replaces: planning before it and the summary after it stay as they are.

No child outlives the launcher:
  * SIGINT/SIGTERM are forwarded to every child's process group (grandchildren included), then
    after `grace_s` (or a second Ctrl-C) the groups are SIGKILLed; jobs not started are cancelled;
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
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from recipe_runner.gpus import DEFAULT_MAX_USED_MIB, GpuInfo, cpu_list_text
from recipe_runner.leases import WHOLE_GPU, Lease, reservations, reserve
from recipe_runner.placement import GpuRoom, choose_gpus, start_order
from recipe_runner.plan import JobSpec, bind_gpus, flag_value, oom_retry, resumed
from recipe_runner.status import PlainReporter, Progress, apply_event, clean_line, fmt_duration
from recipe_runner.summary import TAIL_LINES, JobResult, build_result, job_status
from src.training.progress import parse_line
from src.utils.secrets import redact, secret_values

POLL_S = 0.1  # how often the loop wakes when no line arrives: signal and exit latency
PROBE_EVERY_S = 1.0  # NVML is asked again at most this often while jobs wait for a GPU
PR_SET_PDEATHSIG = 1


@dataclass
class Job:
    """A job at run time (the reporter's JobView)."""

    spec: JobSpec
    progress: Progress = field(default_factory=Progress)
    proc: subprocess.Popen[bytes] | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    log: IO[str] | None = None
    reader: threading.Thread | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    interrupted: bool = False
    exit_code: int | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries (OOM retries)
    last_output: float = 0.0  # time.monotonic() of the last line: a silent job may be hung
    hung: bool = False
    shared_gpu: bool = False  # ran beside another job on one of its GPUs (an OOM then retries it alone)


class GpuPool:
    """The launch's GPUs and the reservations on them: places each job by `placement.choose_gpus`.

    A job reserves its planned memory on each GPU it gets (`spec.reserve_mib`), or the GPUs whole
    (None). Reservations are files every launcher on the host reads (leases.py), so two launchers
    pack onto one GPU only while their planned peaks fit.
    """

    def __init__(
        self,
        gpus: Sequence[GpuInfo],
        probe: Callable[[], list[GpuInfo]],
        lease_dir: Path,
        launch_id: str,
        max_jobs_per_gpu: int = 1,
        max_used_mib: int = DEFAULT_MAX_USED_MIB,
        cores: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.gpus, self.probe, self.lease_dir = list(gpus), probe, lease_dir
        self.cores = dict(cores or {})  # GPU uuid -> the cores its jobs are pinned to (--pin-cpus)
        self.launch_id, self.max_jobs, self.max_used_mib = launch_id, max_jobs_per_gpu, max_used_mib
        self.waiting_for = ""  # why the last take() found nothing, for the user
        self._seen = {gpu.uuid: gpu for gpu in gpus}
        self._seen_at = time.monotonic()
        # What reservations may fill: the memory that was not in use (by others) when the launch began.
        self.capacity = {gpu.uuid: _capacity_mib(gpu, reservations(lease_dir, gpu.uuid)) for gpu in gpus}

    def take(self, spec: JobSpec) -> tuple[list[GpuInfo], list[Lease], bool] | None:
        """GPUs and reservations for `spec`, and whether it shares a GPU; None when it must wait."""
        rooms = self.rooms()
        chosen = choose_gpus(rooms, spec.gpu_count, spec.reserve_mib, self.max_jobs)
        if chosen is None:
            self.waiting_for = "; ".join(f"{r.gpu.label} {r.blocked}" for r in rooms if r.blocked)
            return None
        note = f"recipe {spec.key} launch {self.launch_id}"
        leases = []
        for gpu in chosen:
            mib = WHOLE_GPU if spec.reserve_mib is None else spec.reserve_mib
            lease = reserve(self.lease_dir, gpu.uuid, note, mib, self.capacity[gpu.uuid])
            if lease is None:  # another launcher got there between our look and our reservation
                for held in leases:
                    held.release()
                self.waiting_for = f"{gpu.label} was just reserved by another launcher"
                return None
            leases.append(lease)
        self.waiting_for = ""
        shared = any(room.jobs for room in rooms if room.gpu in chosen)
        return chosen, leases, shared

    def give_back(self, gpus: Sequence[GpuInfo], leases: Sequence[Lease]) -> None:
        for lease in leases:
            lease.release()

    def rooms(self) -> list[GpuRoom]:
        """What each GPU of the pool can take now (`plan` places its first wave on these)."""
        return [self._room(gpu) for gpu in self.gpus]

    def _room(self, gpu: GpuInfo) -> GpuRoom:
        live = reservations(self.lease_dir, gpu.uuid)
        reserved = sum(r.mib for r in live if not r.exclusive)
        blocked = next((f"held whole ({r.note})" for r in live if r.exclusive), None)
        if not live:  # nothing planned is on it: a process there is someone else's
            busy = self._current(gpu).busy_reason(self.max_used_mib)
            blocked = f"busy: {busy}" if busy else None
        elif self.max_jobs == 1:
            blocked = blocked or f"in use ({'; '.join(r.note for r in live)})"
        return GpuRoom(gpu, self.capacity[gpu.uuid], reserved, len(live), blocked)

    def _current(self, gpu: GpuInfo) -> GpuInfo:
        # Someone else may have started on a GPU since the launch began: look again, but
        # not on every loop turn.
        if time.monotonic() - self._seen_at >= PROBE_EVERY_S:
            with contextlib.suppress(Exception):  # a failed probe keeps the last answer
                self._seen = {g.uuid: g for g in self.probe()}
            self._seen_at = time.monotonic()
        return self._seen.get(gpu.uuid, gpu)


def _capacity_mib(gpu: GpuInfo, live: Sequence) -> int:
    # With reservations live, what is in use there is theirs (already counted): only an idle GPU's
    # used memory belongs to someone we cannot see.
    return gpu.memory_total_mib - (0 if live else gpu.memory_used_mib)


@dataclass(frozen=True)
class RunPolicy:
    """How the executor treats faults: OOM retries, hung jobs, the grace period after Ctrl-C."""

    grace_s: float = 30.0
    oom_retries: int = 0  # re-run a job that died of CUDA OOM with half the micro-batch, this often
    hang_timeout_s: float = 0.0  # report a job silent this long (0: never)
    kill_hung: bool = False  # ... and end it


def run_jobs(
    specs: Sequence[JobSpec],
    pool: GpuPool | None,
    reporter: PlainReporter,
    grace_s: float = 30.0,
    policy: RunPolicy | None = None,
    on_change: Callable[[list[JobResult]], None] | None = None,
) -> tuple[list[JobResult], int | None]:
    """Run every job (all at once on CPU, `pool` allowing on GPUs); results in `specs` order and
    the signal that stopped the launch, if one did. `on_change` gets the results so far whenever a
    job starts or ends (the launcher keeps summary.json true with it)."""
    policy = policy or RunPolicy(grace_s=grace_s)
    runner = _Runner([Job(spec) for spec in specs], pool, reporter, policy, on_change)
    runner.run()
    return runner.results(), runner.signum


def _result(job: Job) -> JobResult:
    result = build_result(
        job.spec,
        job.progress,
        job.exit_code,
        job.tail,
        started=job.progress.started is not None,
        interrupted=job.interrupted,
    )
    if job.progress.state in ("queued", "running"):
        result.status = "not started" if job.progress.state == "queued" else "running"
    if job.hung:
        result.status = "hung" if result.status != "succeeded" else result.status
    result.attempts = list(job.attempts)
    return result


class JobLoop:
    """What every backend's loop shares: the jobs, the reporter, signals, and reading lines.

    A backend (local subprocesses here, Ray in ray_backend.py) subclasses it and supplies how jobs
    start, stop and end. Lines pass through `take_line`, which masks secrets, keeps the tail for the
    summary and folds progress events into the live table.
    """

    def __init__(self, jobs: list, reporter: PlainReporter, grace_s: float) -> None:
        self.jobs, self.reporter, self.grace_s = jobs, reporter, grace_s
        self.signum: int | None = None  # first SIGINT/SIGTERM received
        self.kill_now = False  # a second one: skip the grace period
        self.deadline: float | None = None  # when forwarded signals turn into SIGKILL
        self.secrets = secret_values()  # masked in every line the launcher writes

    def run(self) -> None:
        """Turn until no job is queued or running; whatever happens, release every worker."""
        self.reporter.begin(self.jobs)
        with handle_signals(self._on_signal):
            try:
                self._begin()
                while self._queued() or self._running():
                    self._turn()
            finally:
                self._release_all()  # an error in here must not leave workers behind
        self.reporter.close()

    def _begin(self) -> None:
        """Before the first turn (a backend may submit its jobs here)."""

    def _turn(self) -> None:
        raise NotImplementedError

    def _release_all(self) -> None:
        raise NotImplementedError

    def _queued(self) -> list:
        return [job for job in self.jobs if job.progress.state == "queued"]

    def _running(self) -> list:
        return [job for job in self.jobs if job.progress.state == "running"]

    def _on_signal(self, signum: int) -> None:
        # Runs between two bytecodes of the loop: only note it; the loop acts on it.
        if self.signum is None:
            self.signum = signum
        else:
            self.kill_now = True

    def _announce_stop(self) -> int:
        """Tell the user a signal came, cancel the queued jobs; the signal to forward."""
        signum = self.signum or signal.SIGINT
        self.reporter.note(
            f"recipe-run: {signal.Signals(signum).name} received; forwarding it to {len(self._running())} "
            f"running job(s), SIGKILL in {self.grace_s:g}s (send it again to kill now)"
        )
        for job in self._queued():
            job.progress.state = "cancelled"
            job.interrupted = True
        self.deadline = time.monotonic() + self.grace_s
        return signum

    def take_line(self, job, text: str) -> None:
        if job.log is None:  # a straggler after the job closed
            return
        text = redact(text, self.secrets)
        job.last_output = time.monotonic()
        job.log.write(text + "\n")
        event = parse_line(text)
        if event is not None:
            apply_event(job.progress, event, time.monotonic())
        elif clean_line(text):
            job.tail.append(clean_line(text))
        self.reporter.line(job, text, event)

    def _mark_ended(self, job, exit_code: int | None) -> None:
        job.exit_code = exit_code
        progress = job.progress
        progress.ended, progress.ended_at = time.monotonic(), time.time()
        progress.state = job_status(exit_code, started=True, interrupted=job.interrupted)
        took = fmt_duration(progress.elapsed(progress.ended))
        self.reporter.note(f"{self.reporter.prefix(job)} {progress.state} (exit {exit_code}) in {took}")


class _Runner(JobLoop):
    def __init__(
        self,
        jobs: list[Job],
        pool: GpuPool | None,
        reporter: PlainReporter,
        policy: RunPolicy,
        on_change: Callable[[list[JobResult]], None] | None = None,
    ) -> None:
        super().__init__(jobs, reporter, policy.grace_s)
        self.pool, self.policy, self.on_change = pool, policy, on_change
        self.lines: queue.SimpleQueue[tuple[Job, str | None]] = queue.SimpleQueue()
        self._waiting_note = ""

    def results(self) -> list[JobResult]:
        return [_result(job) for job in self.jobs]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.results())

    def _begin(self) -> None:
        self._changed()

    def _release_all(self) -> None:
        self._kill_running()

    def _turn(self) -> None:
        if self.signum is not None and self.deadline is None:
            self._stop()
        if self.signum is None:
            self._start_ready()
        self._drain(timeout=POLL_S)
        for job in self._running():
            if job.proc is not None and job.proc.poll() is not None:
                self._finish(job)
        if self.deadline is not None and (self.kill_now or time.monotonic() > self.deadline):
            self._kill_running()
        self._watch_for_hangs()
        self.reporter.tick()

    def _watch_for_hangs(self) -> None:
        limit = self.policy.hang_timeout_s
        if limit <= 0:
            return
        now = time.monotonic()
        for job in self._running():
            if job.hung or now - job.last_output < limit:
                continue
            job.hung = True
            action = "ending it" if self.policy.kill_hung else "still waiting (--kill-hung ends such jobs)"
            self.reporter.note(f"{self.reporter.prefix(job)} no output for {limit:g}s: looks hung; {action}")
            if self.policy.kill_hung:
                _signal_group(job, signal.SIGKILL)

    def _stop(self) -> None:
        running = self._running()
        signum = self._announce_stop()
        for job in running:
            job.interrupted = True
            _signal_group(job, signum)

    def _start_ready(self) -> None:
        queued = self._queued()
        waiting = None
        for index in start_order([job.spec.predicted_s for job in queued]):
            job = queued[index]
            if self.pool is None:
                self._spawn(job)
                continue
            taken = self.pool.take(job.spec)
            if taken is None:
                waiting = waiting or job
                continue  # a smaller job behind it may still fit beside the running ones
            job.gpus, job.leases, job.shared_gpu = taken
            if job.shared_gpu:
                self._mark_sharing(job)
            job.spec = bind_gpus(job.spec, job.gpus, self.pool.cores)
            self._spawn(job)
        if waiting is not None:
            self._note_waiting(waiting)

    def _mark_sharing(self, job: Job) -> None:
        """The jobs already on `job`'s GPUs now share them too."""
        uuids = {gpu.uuid for gpu in job.gpus}
        for other in self._running():
            if uuids & {gpu.uuid for gpu in other.gpus}:
                other.shared_gpu = True

    def _note_waiting(self, job: Job) -> None:
        why = self.pool.waiting_for if self.pool else ""
        if why and why != self._waiting_note:
            self.reporter.note(f"recipe-run: {job.spec.key} waits for a GPU ({why})")
        self._waiting_note = why

    def _spawn(self, job: Job) -> None:
        spec = job.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered so that `tail -f` on the log follows the run.
        job.log = open(spec.log_path, "a", encoding="utf-8", errors="replace", buffering=1)
        job.log.write(f"# command: {shlex.join(spec.argv)}\n# env: {shlex.join(_env_words(spec.env))}\n")
        if spec.cpus:
            job.log.write(f"# cores: {cpu_list_text(spec.cpus)}\n")
        try:
            job.proc = spawn(spec.argv, spec.env, spec.cpus)
        except OSError as error:
            self._spawn_failed(job, error)
            return
        progress = job.progress
        progress.state, progress.pid = "running", job.proc.pid
        progress.started, progress.started_at = time.monotonic(), time.time()
        job.last_output = progress.started
        job.reader = threading.Thread(target=_pump, args=(job, job.proc.stdout, self.lines), daemon=True)
        job.reader.start()
        self.reporter.note(f"{self.reporter.prefix(job)} started, pid {job.proc.pid}, log {spec.log_path}")
        self._changed()

    def _spawn_failed(self, job: Job, error: OSError) -> None:
        job.progress.state, job.progress.error = "failed", f"could not start {job.spec.argv[0]!r}: {error}"
        job.tail.append(job.progress.error)
        self._close_job(job)
        self.reporter.note(f"{self.reporter.prefix(job)} {job.progress.error}")

    def _drain(self, timeout: float) -> None:
        try:
            job, text = self.lines.get(timeout=timeout)
        except queue.Empty:
            return
        self._take_line(job, text)
        with contextlib.suppress(queue.Empty):
            for _ in range(5000):  # bounded, so the table still redraws under a flood of lines
                self._take_line(*self.lines.get_nowait())

    def _take_line(self, job: Job, text: str | None) -> None:
        if text is not None:  # None: the end of a job's stream
            self.take_line(job, text)

    def _finish(self, job: Job) -> None:
        assert job.proc is not None
        _signal_group(job, signal.SIGKILL)  # leftovers of a finished worker
        if job.reader is not None:
            job.reader.join(timeout=2.0)
        with contextlib.suppress(queue.Empty):
            while True:
                self._take_line(*self.lines.get_nowait())
        self._close_job(job)
        self._mark_ended(job, job.proc.returncode)
        if job.progress.state == "oom" and self.signum is None:
            self._retry_after_oom(job)
        self._changed()

    def _retry_after_oom(self, job: Job) -> None:
        """Queue the job again, if allowed: alone on a GPU when it shared one (its plan was right, its
        neighbours took the memory), else with half the micro-batch and twice the accumulation."""
        if len(job.attempts) >= self.policy.oom_retries:
            return
        if job.shared_gpu:
            self._retry_alone(job)
            return
        retry = oom_retry(job.spec)
        if retry is None:
            return
        batch, accum = flag_value(retry.argv, "--batch-size"), flag_value(retry.argv, "--grad-accum")
        job.attempts.append(
            {
                "status": "oom",
                "exit_code": job.exit_code,
                "batch_size": flag_value(job.spec.argv, "--batch-size"),
                "grad_accum": flag_value(job.spec.argv, "--grad-accum"),
                "duration_s": job.progress.elapsed(job.progress.ended or 0.0),
            }
        )
        self.reporter.note(
            f"{self.reporter.prefix(job)} out of GPU memory: retry {len(job.attempts)} of "
            f"{self.policy.oom_retries} with --batch-size {batch} --grad-accum {accum} (same effective batch)"
        )
        self._requeue(job, retry)

    def _retry_alone(self, job: Job) -> None:
        job.attempts.append(
            {
                "status": "oom",
                "exit_code": job.exit_code,
                "shared_gpu": True,
                "retry": "alone on a GPU",
                "duration_s": job.progress.elapsed(job.progress.ended or 0.0),
            }
        )
        self.reporter.note(
            f"{self.reporter.prefix(job)} out of GPU memory beside other jobs: retry {len(job.attempts)} of "
            f"{self.policy.oom_retries} alone on a GPU, same settings"
        )
        self._requeue(job, resumed(replace(job.spec, reserve_mib=None)))

    def _requeue(self, job: Job, spec: JobSpec) -> None:
        job.spec = replace(spec, gpus=())
        job.progress, job.proc, job.exit_code, job.reader, job.gpus = Progress(), None, None, None, []
        job.shared_gpu = False

    def _close_job(self, job: Job) -> None:
        if job.log is not None:
            job.log.close()
            job.log = None
        if self.pool is not None and job.gpus:
            self.pool.give_back(job.gpus, job.leases)
            job.leases = []

    def _kill_running(self) -> None:
        for job in self._running():
            _signal_group(job, signal.SIGKILL)
            if job.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.proc.wait(timeout=5)
                if job.proc.poll() is not None:
                    self._finish(job)


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


def _signal_group(job: Job, signum: int) -> None:
    if job.proc is None:
        return
    # The child is its group's leader (start_new_session), so its pid is the group id. The group
    # can outlive the leader, so this still reaches grandchildren after the worker has exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(job.proc.pid, signum)


def _pump(job: Job, stream: IO[bytes], lines: queue.SimpleQueue[tuple[Job, str | None]]) -> None:
    """Reader thread: whole lines from a child's pipe onto the shared queue, None at the end."""
    with stream:
        for raw in iter(stream.readline, b""):
            lines.put((job, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
    lines.put((job, None))


@contextlib.contextmanager
def handle_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call `on_signal` for the duration; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: on_signal(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _env_words(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in sorted(env.items())]
