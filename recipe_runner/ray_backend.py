"""Run planned jobs on a Ray cluster: the `--backend ray` twin of `execute.run_jobs`.

    recipe-run --backend ray --ray-address auto --recipes all --output-dir /shared/outputs

Planning, the summary, the report and the exit codes are the local backend's; only "start these
jobs and watch them" differs. Ray does the scheduling over hosts: each `JobSpec` becomes one Ray
actor asking for `gpus_per_job` GPUs (on `cpu`, `spec.threads` CPUs and no GPU), which starts the
same worker argv as a subprocess on the node Ray chose, with `CUDA_VISIBLE_DEVICES` set from
`ray.get_gpu_ids()` (plus `CUDA_DEVICE_ORDER=PCI_BUS_ID`, `BASE_ENV` and `spec.env`; a
`CUDA_VISIBLE_DEVICES` planned on the launcher's host is dropped). An r3 chain is one job, so both
stages run in one process on the same GPU. The launcher polls each actor for batches of the
worker's lines and feeds them through the same log files, reporter and live table as `run_jobs`.

What every node needs (Ray ships no files):
  * the launch directory on storage every node shares, at the same path: the worker writes
    `spec.output_dir` on whatever node it runs, and `summary.json` and the report read it back
    on the launcher's host. The per-recipe logs are written by the launcher itself;
  * the same checkout and Python environment at the same paths as on the launcher: the worker
    argv names the launcher's interpreter (`sys.executable`) and runs in the launcher's working
    directory;
  * the same Python and Ray versions as the launcher (Ray's own rule);
  * secrets such as HF_TOKEN or WANDB_API_KEY in the environment of `ray start` on each node: the
    worker gets the node's environment plus `spec.env`, not the launcher's.

Stopping: SIGINT/SIGTERM are forwarded to every worker's process group on its node, after
`grace_s` (or a second signal) the groups get SIGKILL; jobs still waiting for resources are
cancelled. A worker also dies with its actor (PR_SET_PDEATHSIG), and actors die with the launcher
(Ray ends a driver's actors when it disconnects). A lost node (or actor process) fails its job, or
runs it again up to `retries_on_node_loss` times, its partial output moved aside to
`<output_dir>.lost<N>`; a node that stops answering for `HEARTBEAT_S` counts as lost.

Ray is an optional extra (`pip install 'recipe-runner[ray]'`): it is imported when `run_jobs_ray`
runs, never when this module is imported, so the launcher stays light without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from recipe_runner.execute import JobLoop
from recipe_runner.gpus import GpuInfo
from recipe_runner.plan import BASE_ENV, JobSpec
from recipe_runner.status import PlainReporter, Progress
from recipe_runner.summary import TAIL_LINES, JobResult, build_result

INSTALL_HINT = "pip install 'recipe-runner[ray]'"
POLL_S = 0.1  # how long the launcher's loop waits for an answer: signal and exit latency
BATCH_WAIT_S = 0.5  # how long one poll waits on the node for a first line
BATCH_LINES = 2000  # at most this many lines per answer, so the table still redraws under a flood
HEARTBEAT_S = 120.0  # no answer from a running job's node for this long: the node is lost
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for a node to confirm before giving up on it
CONNECT_TIMEOUT_S = 5.0  # a head that does not accept a connection in this long is not there


class RayUnavailable(RuntimeError):
    """Ray is not installed: the Ray backend is an optional extra."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            f"--backend ray needs Ray, which is not installed here{f' ({detail})' if detail else ''}: "
            f"{INSTALL_HINT}, on the launcher's host and on every node of the cluster"
        )


class RayConnectError(RuntimeError):
    """The Ray head at `--ray-address` cannot be reached (Ray itself would retry for minutes)."""


@dataclass
class RayJob:
    """A job at run time (the reporter's JobView)."""

    spec: JobSpec  # bound to the GPUs Ray gave it once it starts
    planned: JobSpec  # as planned, for a retry
    progress: Progress = field(default_factory=Progress)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    actor: Any = None
    start_ref: Any = None  # answers once the actor is placed and the worker started
    poll_ref: Any = None  # the outstanding poll of a running job
    heard_at: float = 0.0  # time.monotonic() of the node's last answer
    node: str | None = None
    attempt: int = 1
    log: IO[str] | None = None
    interrupted: bool = False
    exit_code: int | None = None
    last_output: float = 0.0  # time.monotonic() of the last line


def run_jobs_ray(
    specs: Sequence[JobSpec],
    reporter: PlainReporter,
    *,
    address: str | None,
    gpus_per_job: int,
    cpu: bool,
    grace_s: float,
    retries_on_node_loss: int = 0,
) -> tuple[list[JobResult], int | None]:
    """Run every job on the Ray cluster at `address` (None: $RAY_ADDRESS, else a new local Ray;
    an already connected Ray is used as it is); results in `specs` order and the signal that
    stopped the launch, if one did."""
    ray = import_ray()
    connected_here = not ray.is_initialized()
    if connected_here:
        check_reachable(address)
        # Workers' lines come back through polls; Ray's own echo of actor output would double them.
        ray.init(address=address, log_to_driver=False)
    try:
        jobs = [RayJob(spec, spec) for spec in specs]
        runner = _RayRunner(ray, jobs, reporter, gpus_per_job, cpu, grace_s, retries_on_node_loss)
        runner.run()
    finally:
        if connected_here:
            ray.shutdown()
    results = [
        build_result(
            job.spec,
            job.progress,
            job.exit_code,
            job.tail,
            started=job.progress.started is not None,
            interrupted=job.interrupted,
        )
        for job in jobs
    ]
    return results, runner.signum


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable(str(error)) from None
    return ray


def check_reachable(address: str | None) -> None:
    """Fail fast on a HOST:PORT head that does not answer; "auto", "ray://..." and None are
    left to Ray."""
    if not address or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayConnectError(
            f"--ray-address {address}: no Ray head answers there ({error}); start one with "
            "`ray start --head` on that host, or check the address and that its port is open"
        ) from None


def worker_env(spec: JobSpec) -> dict[str, str]:
    """What the worker gets on top of its node's environment, before the node adds its GPUs."""
    env = {**BASE_ENV, **spec.env}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # planned for the launcher's host; the node's Ray decides
    return env


class _RayRunner(JobLoop):
    def __init__(
        self,
        ray: Any,
        jobs: list[RayJob],
        reporter: PlainReporter,
        gpus_per_job: int,
        cpu: bool,
        grace_s: float,
        retries: int,
    ) -> None:
        super().__init__(jobs, reporter, grace_s)
        self.ray, self.gpus_per_job, self.cpu, self.retries = ray, gpus_per_job, cpu, retries
        self.actor_class = ray.remote(_job_actor_class())
        self.lost_errors = _lost_errors(ray)
        self.killed_at: float | None = None

    def _begin(self) -> None:
        self._note_cluster()
        for job in self.jobs:
            self._submit(job)

    def _turn(self) -> None:
        if self.signum is not None and self.deadline is None:
            self._stop()
        waiting = {job.start_ref: (job, "start") for job in self._queued() if job.start_ref is not None}
        waiting |= {job.poll_ref: (job, "poll") for job in self._running() if job.poll_ref is not None}
        if waiting:
            refs = list(waiting)
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)
            if ready:
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._answer(ref, *waiting[ref])
        else:
            time.sleep(POLL_S)
        self._check_heartbeats()
        if self.deadline is not None and self.killed_at is None:
            if self.kill_now or time.monotonic() > self.deadline:
                self._kill_running()
        self.reporter.tick()

    def _resources(self, spec: JobSpec) -> dict[str, Any]:
        if self.cpu:
            return {"num_cpus": spec.threads or 1, "num_gpus": 0}
        return {"num_cpus": 1, "num_gpus": self.gpus_per_job}

    def _submit(self, job: RayJob) -> None:
        """Ask Ray for an actor with the job's resources; it starts the worker once placed."""
        # max_concurrency: a poll waits on the node while a signal must still get through.
        options = {**self._resources(job.planned), "max_concurrency": 4, "max_restarts": 0}
        job.actor = self.actor_class.options(**options).remote()
        job.start_ref = job.actor.start.remote(list(job.planned.argv), worker_env(job.planned), os.getcwd())

    def _answer(self, ref: Any, job: RayJob, kind: str) -> None:
        try:
            answer = self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError as error:
            if kind == "start":
                self._lost(job, _first_line(error))
            else:
                self._poll(job)  # transient (a network blip); a node that stays away trips the heartbeat
            return
        except self.lost_errors as error:
            self._lost(job, _first_line(error))
            return
        except self.ray.exceptions.RayError as error:
            self._fail(job, f"Ray error: {_first_line(error)}")
            return
        if kind == "start":
            self._started(job, answer)
            return
        job.heard_at = time.monotonic()
        for text in answer["lines"]:
            self.take_line(job, text)
        if answer["done"]:
            self._finish(job, answer["exit_code"])
        else:
            self._poll(job)

    def _started(self, job: RayJob, info: dict[str, Any]) -> None:
        job.node = f"{info['host']} ({info['node']})"
        job.spec = replace(job.planned, gpus=_gpu_records(info))
        job.start_ref = None
        self._open_log(job, info)
        if info.get("error"):
            self._fail(job, info["error"])
            return
        progress = job.progress
        progress.state, progress.pid = "running", info["pid"]
        progress.started, progress.started_at = time.monotonic(), time.time()
        job.heard_at = time.monotonic()
        gpus = f" GPU {info['cuda_visible_devices']}," if info["cuda_visible_devices"] else ""
        self.reporter.note(
            f"{self.reporter.prefix(job)} started on {job.node},{gpus} pid {info['pid']}, "
            f"log {job.spec.log_path}"
        )
        self._poll(job)

    def _open_log(self, job: RayJob, info: dict[str, Any]) -> None:
        spec = job.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        job.log = open(spec.log_path, "a", encoding="utf-8", errors="replace", buffering=1)
        env = {**worker_env(spec), **info["env"]}
        job.log.write(
            f"# command: {shlex.join(spec.argv)}\n"
            f"# env: {shlex.join(f'{k}={v}' for k, v in sorted(env.items()))}\n"
            f"# ray node: {job.node}, attempt {job.attempt}\n"
        )

    def _poll(self, job: RayJob) -> None:
        job.poll_ref = job.actor.poll.remote(BATCH_WAIT_S, BATCH_LINES)

    def _finish(self, job: RayJob, exit_code: int | None) -> None:
        job.poll_ref = None
        self._close_job(job)
        self._mark_ended(job, exit_code)

    def _fail(self, job: RayJob, why: str) -> None:
        """The job ends without a worker exit code: it could not start, or its node is gone."""
        job.progress.error = why
        job.tail.append(why)
        if job.log is not None:
            job.log.write(f"# recipe-run: {why}\n")
        if job.progress.state == "running":
            self._finish(job, None)
            return
        job.progress.state = "cancelled" if job.interrupted else "failed"
        self._close_job(job)
        self.reporter.note(f"{self.reporter.prefix(job)} {why}")

    def _lost(self, job: RayJob, why: str) -> None:
        where = f" on {job.node}" if job.node else ""
        self._kill_actor(job)
        if self.signum is None and job.attempt <= self.retries:
            self._retry(job, f"lost{where} ({why})")
        else:
            self._fail(job, f"lost{where}: {why}")

    def _retry(self, job: RayJob, why: str) -> None:
        moved = _move_aside(job.planned.output_dir, job.attempt)
        note = f"{why}; retry {job.attempt} of {self.retries}"
        if moved:
            note += f", its partial output moved to {moved}"
        job.tail.append(note)
        if job.log is not None:
            job.log.write(f"# recipe-run: {note}\n")
        self._close_job(job)
        self.reporter.note(f"{self.reporter.prefix(job)} {note}")
        job.attempt += 1
        job.progress, job.spec, job.exit_code, job.node = Progress(), job.planned, None, None
        self._submit(job)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for job in self._running():
            if self.killed_at is not None and now - self.killed_at > KILL_WAIT_S:
                self._kill_actor(job)
                self._fail(job, f"no exit confirmed {KILL_WAIT_S:g}s after SIGKILL; its actor was killed")
            elif now - job.heard_at > HEARTBEAT_S:
                self._lost(job, f"no answer from its node for {now - job.heard_at:.0f}s")

    def _note_cluster(self) -> None:
        """The cluster's size, and a warning when no node is big enough for a job (Ray would
        keep it waiting, silently, for a node that may never join)."""
        if not self.jobs:
            return
        nodes = [node.get("Resources", {}) for node in self.ray.nodes() if node.get("Alive")]
        if self.cpu:
            key, need = "CPU", max(job.planned.threads or 1 for job in self.jobs)
        else:
            key, need = "GPU", self.gpus_per_job
        most = max((res.get(key, 0) for res in nodes), default=0)
        total = sum(res.get(key, 0) for res in nodes)
        self.reporter.note(f"recipe-run: Ray cluster of {len(nodes)} node(s), {total:g} {key}(s) in all")
        if most < need:
            self.reporter.note(
                f"recipe-run: no node has the {need} {key}(s) a recipe asks for (the largest has {most:g}); "
                "the jobs wait until one joins the cluster (Ctrl-C to stop)"
            )

    def _stop(self) -> None:
        running = self._running()
        queued = self._queued()
        signum = self._announce_stop()
        for job in queued:
            self._close_job(job)
        for job in running:
            job.interrupted = True
            job.actor.signal.remote(int(signum))

    def _kill_running(self) -> None:
        # The workers' exits come back through their polls; a node that cannot confirm within
        # KILL_WAIT_S is given up on by _check_heartbeats.
        self.killed_at = time.monotonic()
        for job in self._running():
            job.actor.signal.remote(int(signal.SIGKILL))

    def _kill_actor(self, job: RayJob) -> None:
        if job.actor is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(job.actor, no_restart=True)
        job.actor, job.start_ref, job.poll_ref = None, None, None

    def _close_job(self, job: RayJob) -> None:
        if job.log is not None:
            job.log.close()
            job.log = None
        self._kill_actor(job)  # gives its GPUs back to Ray for the next job

    def _release_all(self) -> None:
        left = [job for job in self.jobs if job.actor is not None]
        signals = [job.actor.signal.remote(int(signal.SIGKILL)) for job in left if job.poll_ref is not None]
        with contextlib.suppress(Exception):
            self.ray.wait(signals, num_returns=len(signals), timeout=5.0)
        for job in left:
            self._close_job(job)


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors that mean the job's actor, worker process or node went away."""
    errors = ray.exceptions
    return (errors.RayActorError, errors.WorkerCrashedError, errors.NodeDiedError, errors.ObjectLostError)


def _gpu_records(info: dict[str, Any]) -> tuple[GpuInfo, ...]:
    """The GPUs a node gave a job, for the prefix, the table and summary.json."""
    return tuple(GpuInfo(index=gpu["index"], uuid=gpu["uuid"], name=gpu["name"]) for gpu in info["gpus"])


def _move_aside(output_dir: Path, attempt: int) -> str | None:
    # The worker refuses a non-empty output directory; keep the lost attempt's files for a look.
    if not output_dir.exists():
        return None
    target = output_dir.with_name(f"{output_dir.name}.lost{attempt}")
    with contextlib.suppress(OSError):
        output_dir.rename(target)
        return str(target)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _job_actor_class() -> type:
    """The actor that runs one worker on its node, defined here so that Ray ships it by value.

    A class defined inside a function is pickled with its code, so a node needs neither
    `recipe_runner` on its path nor anything but the standard library and Ray to run it. Its
    methods therefore use only those, and nothing else from this module.
    """

    class JobActor:
        """One worker subprocess on this node; its merged stdout+stderr handed out in batches."""

        def __init__(self) -> None:
            self._changed = threading.Condition()
            self._lines: list[str] = []
            self._proc: subprocess.Popen[bytes] | None = None
            self._exit_code: int | None = None
            self._done = False

        def start(self, argv: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
            import ray

            ids = [str(gpu) for gpu in ray.get_gpu_ids()]
            added = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(ids)}
            info = {
                "node": ray.util.get_node_ip_address(),
                "host": socket.gethostname(),
                "cuda_visible_devices": added["CUDA_VISIBLE_DEVICES"],
                "env": added,
                "gpus": self._describe_gpus(ids),
                "pid": None,
                "error": None,
            }
            if not os.path.isdir(cwd):
                info["error"] = (
                    f"the launcher's working directory {cwd} does not exist on {info['host']}: "
                    "every node needs the same checkout at the same path"
                )
                self._end(None)
                return info
            spawned = threading.Event()
            child_env = {**os.environ, **env, **added}
            # The thread that forks must live as long as the child (PR_SET_PDEATHSIG is per thread).
            threading.Thread(
                target=self._run, args=(argv, child_env, cwd, spawned, info), daemon=True
            ).start()
            spawned.wait()
            return info

        def poll(self, wait_s: float, max_lines: int) -> dict[str, Any]:
            """The lines printed since the last poll (waiting up to `wait_s` for one); `done` once
            the worker has exited and every line of it has been handed out."""
            with self._changed:
                self._changed.wait_for(lambda: self._lines or self._done, timeout=wait_s)
                batch, self._lines = self._lines[:max_lines], self._lines[max_lines:]
                done = self._done and not self._lines
                return {"lines": batch, "done": done, "exit_code": self._exit_code if done else None}

        def signal(self, signum: int) -> bool:
            """Send `signum` to the worker's process group (its grandchildren too)."""
            if self._proc is None:
                return False
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signum)
            return True

        def _run(
            self, argv: list[str], env: dict[str, str], cwd: str, spawned: threading.Event, info: dict
        ) -> None:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: signals reach grandchildren
                    preexec_fn=self._child_setup_hook(),
                )
            except OSError as error:
                info["error"] = f"could not start {argv[0]!r} on {info['host']}: {error}"
                spawned.set()
                self._end(None)
                return
            info["pid"] = self._proc.pid
            spawned.set()
            assert self._proc.stdout is not None
            with self._proc.stdout as stream:
                for raw in iter(stream.readline, b""):
                    with self._changed:
                        self._lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                        self._changed.notify_all()
            code = self._proc.wait()
            self.signal(signal.SIGKILL)  # leftovers of a finished worker must not hold its GPU
            self._end(code)

        def _end(self, code: int | None) -> None:
            with self._changed:
                self._exit_code, self._done = code, True
                self._changed.notify_all()

        @staticmethod
        def _child_setup_hook() -> Any:
            """Runs in the worker between fork and exec: no signal blocked (Ray's threads block
            SIGINT, and a blocked mask survives exec, so the worker would never see a Ctrl-C), and
            SIGKILL for the worker when this actor dies (killed, or its node's Ray stopped)."""
            prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
            parent = os.getpid()

            def hook() -> None:
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                if prctl is not None:
                    prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the actor died before prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)

            return hook

        @staticmethod
        def _describe_gpus(ids: list[str]) -> list[dict[str, Any]]:
            """Index, UUID and name of each GPU Ray gave, from NVML when the node has it."""
            found = [
                {"index": int(gpu) if gpu.isdigit() else n, "uuid": gpu, "name": "NVIDIA GPU"}
                for n, gpu in enumerate(ids)
            ]
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception:
                for gpu in found:  # no NVML here (or logical GPUs): name it by node and Ray's id
                    if not gpu["uuid"].startswith("GPU-"):
                        gpu["uuid"] = f"ray-gpu{gpu['uuid']}@{socket.gethostname()}"
                return found
            try:
                for gpu in found:
                    if gpu["uuid"].startswith("GPU-"):
                        handle = pynvml.nvmlDeviceGetHandleByUUID(gpu["uuid"])
                    else:
                        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu["index"])
                    gpu["uuid"] = pynvml.nvmlDeviceGetUUID(handle)
                    gpu["name"] = pynvml.nvmlDeviceGetName(handle)
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    pynvml.nvmlShutdown()
            return found

    return JobActor
