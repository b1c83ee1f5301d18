"""The run loop: every rule about jobs, the same for every backend (`base.Backend`: local or Ray).

`run_jobs(specs, backend, reporter, policy, on_change)` starts the jobs longest predicted first as the
backend finds room, reads every line they print (to the job's log, the reporter and its live table),
and returns one `JobResult` per job and the signal that stopped the launch, if one did. The policy:
  * a packed job (held to its reservation: BUDGET_ENV, which its worker caps its memory at) or one that
    shared a GPU, that runs out of GPU memory, is run again alone on a GPU, uncapped, with the same
    settings (the OOM was its own reservation's, or its neighbours'; a whole GPU may hold it); one that
    ran alone is run again with half the micro-batch and twice the accumulation, from its last
    checkpoint; `oom_retries` times;
  * a job silent for `hang_timeout_s` is reported as hung, and ended with `kill_hung`;
  * a job whose node was lost (Ray) runs again `lost_retries` times, its partial output moved aside;
  * SIGINT/SIGTERM are forwarded to every running job, queued ones are cancelled, and after `grace_s`
    (or a second signal) the running ones get SIGKILL;
  * `on_change` gets the results so far whenever a job starts or ends (summary.json kept true).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from recipe_runner.backends.base import Backend, Event, Exited, Line, Lost, Started
from recipe_runner.planning.jobs import JobSpec, alone, oom_retry, resumed
from recipe_runner.planning.placement import start_order
from recipe_runner.results.live import PlainReporter, Progress, apply_event, clean_line, fmt_duration
from recipe_runner.results.summary import TAIL_LINES, JobResult, build_result, job_status
from src.contract.env import budget_mib
from src.contract.flags import flag_name, flag_value
from src.contract.progress import parse_line
from src.utils.secrets import redact, secret_values

POLL_S = 0.1  # how long one turn waits for an event: signal and exit latency


@dataclass(frozen=True)
class RunPolicy:
    """How the loop treats faults: OOM retries, hung jobs, lost nodes, the grace period after Ctrl-C."""

    grace_s: float = 30.0
    oom_retries: int = 0  # re-run a job that died of CUDA OOM (alone, or with half the micro-batch)
    hang_timeout_s: float = 0.0  # report a job silent this long (0: never)
    kill_hung: bool = False  # ... and end it
    lost_retries: int = 0  # re-run a job whose node (or actor) was lost, this often


@dataclass
class Job:
    """A job at run time (the reporter's JobView)."""

    spec: JobSpec  # as started: bound to its GPUs
    planned: JobSpec  # as planned: what a lost node's retry starts from
    progress: Progress = field(default_factory=Progress)
    log: IO[str] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    interrupted: bool = False
    exit_code: int | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries (OOM retries, lost nodes)
    last_output: float = 0.0  # time.monotonic() of the last line: a silent job may be hung
    hung: bool = False
    shared_gpu: bool = False  # ran beside another job on one of its GPUs (an OOM then retries it alone)
    submitted: bool = False  # handed to the backend, not started yet
    lost: int = 0  # times its node was lost


def run_jobs(
    specs: Sequence[JobSpec],
    backend: Backend,
    reporter: PlainReporter,
    policy: RunPolicy | None = None,
    on_change: Callable[[list[JobResult]], None] | None = None,
) -> tuple[list[JobResult], int | None]:
    """Run every job; results in `specs` order and the signal that stopped the launch, if one did."""
    loop = JobLoop([Job(spec, spec) for spec in specs], backend, reporter, policy or RunPolicy(), on_change)
    loop.run()
    return loop.results(), loop.signum


class JobLoop:
    def __init__(
        self,
        jobs: list[Job],
        backend: Backend,
        reporter: PlainReporter,
        policy: RunPolicy,
        on_change: Callable[[list[JobResult]], None] | None = None,
    ) -> None:
        self.jobs, self.backend, self.reporter, self.policy = jobs, backend, reporter, policy
        self.on_change = on_change
        self.by_key = {job.spec.key: job for job in jobs}
        self.signum: int | None = None  # first SIGINT/SIGTERM received
        self.kill_now = False  # a second one: skip the grace period
        self.deadline: float | None = None  # when forwarded signals turn into SIGKILL
        self.killed = False
        self.secrets = secret_values()  # masked in every line the launcher writes
        self._waiting_note = ""

    def run(self) -> None:
        """Turn until no job is queued or running; whatever happens, release every worker."""
        self.reporter.begin(self.jobs)
        # Opened before our handlers go in: connecting to Ray installs its own SIGTERM handler.
        notes = self.backend.open([job.spec for job in self.jobs])
        with handle_signals(self._on_signal):
            try:
                for note in notes:
                    self.reporter.note(note)
                self._changed()
                while self._queued() or self._running():
                    self._turn()
            finally:
                self._release_all()  # an error in here must not leave workers behind
        self.reporter.close()

    def results(self) -> list[JobResult]:
        return [_result(job) for job in self.jobs]

    def _turn(self) -> None:
        if self.signum is not None and self.deadline is None:
            self._stop()
        if self.signum is None:
            self._start_ready()
        for event in self.backend.poll(POLL_S):
            self._handle(event)
        if self.deadline is not None and not self.killed:
            if self.kill_now or time.monotonic() > self.deadline:
                self._kill_running()
        self._watch_for_hangs()
        self.reporter.tick()

    def _queued(self) -> list[Job]:
        return [job for job in self.jobs if job.progress.state == "queued"]

    def _running(self) -> list[Job]:
        return [job for job in self.jobs if job.progress.state == "running"]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.results())

    def _start_ready(self) -> None:
        queued = [job for job in self._queued() if not job.submitted]
        waiting = None
        for index in start_order([job.spec.predicted_s for job in queued]):
            job = queued[index]
            if self.backend.start(job.spec):
                job.submitted = True
            else:
                waiting = waiting or job  # a smaller job behind it may still fit beside the running ones
        if waiting is not None:
            self._note_waiting(waiting)

    def _note_waiting(self, job: Job) -> None:
        why = self.backend.waiting_for()
        if why and why != self._waiting_note:
            self.reporter.note(f"recipe-run: {job.spec.key} waits for {why}")
        self._waiting_note = why

    def _handle(self, event: Event) -> None:
        job = self.by_key[event.key]
        if isinstance(event, Line):
            self.take_line(job, event.text)
        elif isinstance(event, Started):
            self._started(job, event)
        elif isinstance(event, Exited):
            self._exited(job, event)
        elif isinstance(event, Lost):
            self._lost(job, event.why, event.where)

    def _started(self, job: Job, event: Started) -> None:
        job.spec, job.submitted, job.shared_gpu = event.spec, False, event.shared_gpu
        if event.shared_gpu:
            self._mark_sharing(job)
        job.log = _open_log(job.spec.log_path)
        for line in event.header:
            job.log.write(line + "\n")
        progress = job.progress
        progress.state, progress.pid = "running", event.pid
        progress.started, progress.started_at = time.monotonic(), time.time()
        job.last_output = progress.started
        self.reporter.note(f"{self.reporter.prefix(job)} started, {event.where}, log {job.spec.log_path}")
        self._changed()

    def _mark_sharing(self, job: Job) -> None:
        """The jobs already on `job`'s GPUs now share them too."""
        uuids = {gpu.uuid for gpu in job.spec.gpus}
        for other in self._running():
            if uuids & {gpu.uuid for gpu in other.spec.gpus}:
                other.shared_gpu = True

    def take_line(self, job: Job, text: str) -> None:
        """A worker's line: secrets masked, into its log, the tail kept for the summary, progress events
        folded into the live table."""
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

    def _exited(self, job: Job, event: Exited) -> None:
        job.submitted = False
        if job.progress.state != "running":
            self._fail_unstarted(job, event.why or "ended before it started")
            return
        if event.why:
            job.progress.error = job.progress.error or event.why
            self._say(job, event.why)
        self._close_log(job)
        self._mark_ended(job, event.code)
        if job.progress.state == "oom" and self.signum is None:
            self._retry_after_oom(job)
        self._changed()

    def _fail_unstarted(self, job: Job, why: str) -> None:
        job.progress.error = why
        job.progress.state = "cancelled" if job.interrupted else "failed"
        job.log = job.log or _open_log(job.spec.log_path)
        self._say(job, why)
        self._close_log(job)
        self.reporter.note(f"{self.reporter.prefix(job)} {why}")
        self._changed()

    def _say(self, job: Job, why: str) -> None:
        """A launcher's word about the job: in its tail (the summary) and its log."""
        job.tail.append(why)
        if job.log is not None:
            job.log.write(f"# recipe-run: {why}\n")

    def _mark_ended(self, job: Job, exit_code: int | None) -> None:
        job.exit_code = exit_code
        progress = job.progress
        progress.ended, progress.ended_at = time.monotonic(), time.time()
        progress.state = job_status(exit_code, started=True, interrupted=job.interrupted)
        took = fmt_duration(progress.elapsed(progress.ended))
        self.reporter.note(f"{self.reporter.prefix(job)} {progress.state} (exit {exit_code}) in {took}")

    def _retry_after_oom(self, job: Job) -> None:
        """Queue the job again, if allowed: alone on a GPU, uncapped, when it was held to a reservation (the
        OOM was its own: its worker capped its memory there) or shared a GPU (its neighbours may have taken
        the memory), else with half the micro-batch and twice the accumulation."""
        if len(job.attempts) >= self.policy.oom_retries:
            return
        attempt = {"status": "oom", "exit_code": job.exit_code, "duration_s": _took(job)}
        budget = budget_mib(job.spec.env)
        if job.shared_gpu or budget is not None:
            held = {"reservation_gib": round(budget / 1024, 2)} if budget is not None else {}
            job.attempts.append({**attempt, "shared_gpu": job.shared_gpu, **held, "retry": "alone on a GPU"})
            why = (
                f"under its {budget / 1024:.1f} GiB reservation"
                if budget is not None
                else "beside other jobs"
            )
            self.reporter.note(
                f"{self.reporter.prefix(job)} out of GPU memory {why}: retry {len(job.attempts)} of "
                f"{self.policy.oom_retries} alone on a GPU, uncapped, same settings"
            )
            self._requeue(job, resumed(alone(job.spec)))
            return
        retry = oom_retry(job.spec)
        if retry is None:
            return
        batch, accum = (
            flag_value(retry.argv, flag_name("batch_size")),
            flag_value(retry.argv, flag_name("grad_accum")),
        )
        job.attempts.append(
            {
                **attempt,
                "batch_size": flag_value(job.spec.argv, flag_name("batch_size")),
                "grad_accum": flag_value(job.spec.argv, flag_name("grad_accum")),
            }
        )
        self.reporter.note(
            f"{self.reporter.prefix(job)} out of GPU memory: retry {len(job.attempts)} of "
            f"{self.policy.oom_retries} with --batch-size {batch} --grad-accum {accum} (same effective batch)"
        )
        self._requeue(job, retry)

    def _lost(self, job: Job, why: str, where: str) -> None:
        """The job's node went away: run it again from its plan if allowed, its partial output aside."""
        if self.signum is None and job.lost < self.policy.lost_retries:
            job.lost += 1
            moved = _move_aside(job.planned.output_dir, job.lost)
            note = f"lost{where} ({why}); retry {job.lost} of {self.policy.lost_retries}"
            if moved:
                note += f", its partial output moved to {moved}"
            self._say(job, note)
            self._close_log(job)
            self.reporter.note(f"{self.reporter.prefix(job)} {note}")
            job.attempts.append({"status": "lost", "error": why, "duration_s": _took(job)})
            self._requeue(job, job.planned)
            return
        if job.progress.state == "running":
            self._exited(job, Exited(job.spec.key, None, f"lost{where}: {why}"))
        else:
            self._fail_unstarted(job, f"lost{where}: {why}")

    def _requeue(self, job: Job, spec: JobSpec) -> None:
        job.spec = replace(spec, gpus=())
        job.progress, job.exit_code, job.shared_gpu, job.submitted = Progress(), None, False, False

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
                self.backend.signal(job.spec.key, signal.SIGKILL)

    def _on_signal(self, signum: int) -> None:
        # Runs between two bytecodes of the loop: only note it; the loop acts on it.
        if self.signum is None:
            self.signum = signum
        else:
            self.kill_now = True

    def _stop(self) -> None:
        """Tell the user a signal came, cancel the queued jobs, forward the signal to the running ones."""
        signum = self.signum or signal.SIGINT
        running = self._running()
        self.reporter.note(
            f"recipe-run: {signal.Signals(signum).name} received; forwarding it to {len(running)} "
            f"running job(s), SIGKILL in {self.policy.grace_s:g}s (send it again to kill now)"
        )
        for job in self._queued():
            if job.submitted:
                self.backend.cancel(job.spec.key)
            job.progress.state, job.interrupted, job.submitted = "cancelled", True, False
        for job in running:
            job.interrupted = True
            self.backend.signal(job.spec.key, signum)
        self.deadline = time.monotonic() + self.policy.grace_s
        self._changed()

    def _kill_running(self) -> None:
        self.killed = True
        for job in self._running():
            self.backend.signal(job.spec.key, signal.SIGKILL)

    def _release_all(self) -> None:
        with contextlib.suppress(Exception):
            self.backend.close()
        with contextlib.suppress(Exception):
            for event in self.backend.poll(0.0):
                self._handle(event)
        for job in self._running():  # no word of its end came back
            self._close_log(job)
            self._mark_ended(job, None)

    def _close_log(self, job: Job) -> None:
        if job.log is not None:
            job.log.close()
            job.log = None


def _result(job: Job) -> JobResult:
    result = build_result(
        job.spec,
        job.progress,
        job.exit_code,
        job.tail,
        started=job.progress.started is not None,
        interrupted=job.interrupted,
        planned=job.planned,  # its reservation as planned, also after a retry alone
    )
    if job.progress.state in ("queued", "running"):
        result.status = "not started" if job.progress.state == "queued" else "running"
    if job.hung and result.status != "succeeded":
        result.status = "hung"
    result.attempts = list(job.attempts)
    return result


def _took(job: Job) -> float | None:
    return job.progress.elapsed(job.progress.ended or time.monotonic())


def _open_log(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered so that `tail -f` on the log follows the run.
    return open(path, "a", encoding="utf-8", errors="replace", buffering=1)


def _move_aside(output_dir: Path, attempt: int) -> str | None:
    # The worker refuses a non-empty output directory; keep the lost attempt's files for a look.
    if not output_dir.exists():
        return None
    target = output_dir.with_name(f"{output_dir.name}.lost{attempt}")
    with contextlib.suppress(OSError):
        output_dir.rename(target)
        return str(target)
    return None


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
