"""The Ray backend: each job one Ray actor, which starts the worker as a subprocess on the node Ray chose.

    ray start --head                              # on the head node, with the installed Ray's defaults
    recipe-run --backend ray --ray-address HEAD:6379 --recipes all --output-dir /shared/outputs

The run loop (loop.py) applies the same policy as on one host (OOM retries, hung jobs, signals, the
summary kept true); only "start these jobs and watch them" differs. Each job asks Ray for
`gpus_per_job` GPUs (on `cpu`, `spec.threads` CPUs and no GPU); its actor starts the same worker argv
with `CUDA_VISIBLE_DEVICES` from `ray.get_gpu_ids()` (plus `CUDA_DEVICE_ORDER=PCI_BUS_ID`, BASE_ENV and
`spec.env`; a `CUDA_VISIBLE_DEVICES` planned on the launcher's host is dropped). An r3 chain is one job,
so both stages run in one process on the same GPU. The launcher polls each actor for batches of the
worker's lines.

Connecting (`connect`): a head started by `ray start --head` turns token authentication on when its host
has a token (`~/.ray/auth_token`, which any local `ray.init()` writes); Ray's own driver then connects to
an explicit address only with `RAY_AUTH_MODE=token` set. The launcher sets it whenever it finds a token
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; a head without authentication accepts it too),
and asks the head once, in under a second, before anything starts: an unreachable head, or one that
refuses the token, exits 2 with what to do instead of Ray's 20 s of retries and a traceback.

What every node needs (Ray ships no files): the launch directory on storage every node shares, at the
same path; the same checkout and Python environment at the same paths as the launcher; the same Python
and Ray versions; secrets (HF_TOKEN, WANDB_API_KEY) in the environment of `ray start` on each node.

A node that stops answering for HEARTBEAT_S counts as lost (`Lost`: the loop may run the job again).
Ray is an optional extra (`pip install 'recipe-runner[ray]'`), imported only when a Ray launch connects.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recipe_runner.backends.base import Event, Exited, Line, Lost, Started
from recipe_runner.backends.ray_actor import job_actor_class
from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.jobs import JobSpec
from src.contract.env import BASE_ENV

INSTALL_HINT = "pip install 'recipe-runner[ray]'"
BATCH_WAIT_S = 0.5  # how long one poll waits on the node for a first line
BATCH_LINES = 2000  # at most this many lines per answer, so the table still redraws under a flood
HEARTBEAT_S = 120.0  # no answer from a running job's node for this long: the node is lost
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for a node to confirm before giving up on it
CONNECT_TIMEOUT_S = 5.0  # a head that does not accept a connection in this long is not there
AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray start` and `ray.init()` keep it


class RayUnavailable(RuntimeError):
    """Ray is not installed: the Ray backend is an optional extra."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            f"--backend ray needs Ray, which is not installed here{f' ({detail})' if detail else ''}: "
            f"{INSTALL_HINT}, on the launcher's host and on every node of the cluster"
        )


class RayConnectError(RuntimeError):
    """The Ray head at `--ray-address` cannot be reached, or refuses this launcher."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable(str(error)) from None
    return ray


def connect(address: str | None) -> None:
    """Ray installed, the head reachable and accepting this launcher, or RayUnavailable/RayConnectError
    within seconds. "auto", "ray://..." and None (a new local Ray) are left to Ray."""
    use_token_if_found()  # before Ray loads: its core reads the mode once
    import_ray()
    check_reachable(address)
    check_accepted(address)


def use_token_if_found(environ: dict[str, str] | Any = None) -> bool:
    """Token authentication on for this process when a token is at hand and nobody chose a mode, as
    `ray start` does for the head; True when it is on."""
    environ = os.environ if environ is None else environ
    mode = environ.get(AUTH_MODE_ENV)
    if mode is not None:
        return mode.lower() == "token"
    path = Path(environ.get(TOKEN_PATH_ENV) or TOKEN_FILE)
    if environ.get(TOKEN_ENV) or path.is_file():
        environ[AUTH_MODE_ENV] = "token"
        return True
    return False


def _host_port(address: str | None) -> tuple[str, int] | None:
    if not address or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_reachable(address: str | None) -> None:
    """Fail fast on a HOST:PORT head that does not answer (Ray itself would retry for minutes)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayConnectError(
            f"--ray-address {address}: no Ray head answers there ({error}); start one with "
            "`ray start --head` on that host, or check the address and that its port is open"
        ) from None


def check_accepted(address: str | None) -> None:
    """Ask the head at HOST:PORT once whether it accepts this launcher (its token, if it wants one)."""
    if _host_port(address) is None:
        return
    ray = import_ray()
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # the client Ray's driver connects with

    try:
        GcsClient(address=address)
    except ray.exceptions.AuthenticationError:
        token = "RAY_AUTH_TOKEN" if os.environ.get(TOKEN_ENV) else str(TOKEN_FILE)
        have = f"the token in {token} is not the head's" if use_token_if_found() else "this host has no token"
        raise RayConnectError(
            f"--ray-address {address}: the Ray head refused this launcher: it wants an authentication "
            f"token and {have}. Copy the head's ~/.ray/auth_token to this host (or set RAY_AUTH_TOKEN to "
            "it; `ray get-auth-token` on the head prints it), then run again"
        ) from None
    except Exception:  # anything else is Ray's own to report when it connects
        return


@dataclass
class _RayJob:
    planned: JobSpec
    actor: Any
    start_ref: Any = None  # answers once the actor is placed and the worker started
    poll_ref: Any = None  # the outstanding poll of a running job
    node: str | None = None
    heard_at: float = 0.0  # time.monotonic() of the node's last answer
    killed_at: float | None = None


class RayBackend:
    """Jobs as Ray actors on the cluster at `address` (None: $RAY_ADDRESS, else a new local Ray; a Ray
    already connected in this process is used as it is)."""

    def __init__(self, address: str | None, gpus_per_job: int, cpu: bool) -> None:
        self.address, self.gpus_per_job, self.cpu = address, gpus_per_job, cpu
        self.jobs: dict[str, _RayJob] = {}
        self.starts: dict[str, int] = {}
        self.ray: Any = None
        self.connected_here = False

    def describe(self) -> str:
        return f"the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS') or 'a local Ray'}"

    def open(self, specs: list[JobSpec]) -> list[str]:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            connect(self.address)
            # Workers' lines come back through polls; Ray's own echo of actor output would double them.
            self.ray.init(address=self.address, log_to_driver=False)
            self.connected_here = True
        self.actor_class = self.ray.remote(job_actor_class())
        errors = self.ray.exceptions
        self.lost_errors = (
            errors.RayActorError,
            errors.WorkerCrashedError,
            errors.NodeDiedError,
            errors.ObjectLostError,
        )
        return self._cluster_notes(specs)

    def _cluster_notes(self, specs: list[JobSpec]) -> list[str]:
        """The cluster's size, and a warning when no node is big enough for a job (Ray would keep it
        waiting, silently, for a node that may never join)."""
        if not specs:
            return []
        nodes = [node.get("Resources", {}) for node in self.ray.nodes() if node.get("Alive")]
        if self.cpu:
            key, need = "CPU", max(spec.threads or 1 for spec in specs)
        else:
            key, need = "GPU", self.gpus_per_job
        most = max((res.get(key, 0) for res in nodes), default=0)
        total = sum(res.get(key, 0) for res in nodes)
        notes = [f"recipe-run: Ray cluster of {len(nodes)} node(s), {total:g} {key}(s) in all"]
        if most < need:
            notes.append(
                f"recipe-run: no node has the {need} {key}(s) a recipe asks for (the largest has {most:g}); "
                "the jobs wait until one joins the cluster (Ctrl-C to stop)"
            )
        return notes

    def waiting_for(self) -> str:
        return ""

    def start(self, spec: JobSpec) -> bool:
        """Ask Ray for an actor with the job's resources; it starts the worker once placed (Ray queues)."""
        resources = (
            {"num_cpus": spec.threads or 1, "num_gpus": 0}
            if self.cpu
            else {"num_cpus": 1, "num_gpus": self.gpus_per_job}
        )
        # max_concurrency: a poll waits on the node while a signal must still get through.
        actor = self.actor_class.options(**resources, max_concurrency=4, max_restarts=0).remote()
        job = _RayJob(spec, actor)
        job.start_ref = actor.start.remote(list(spec.argv), worker_env(spec), os.getcwd())
        self.jobs[spec.key] = job
        self.starts[spec.key] = self.starts.get(spec.key, 0) + 1
        return True

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        waiting = {
            job.start_ref: (key, "start") for key, job in self.jobs.items() if job.start_ref is not None
        }
        waiting |= {job.poll_ref: (key, "poll") for key, job in self.jobs.items() if job.poll_ref is not None}
        if waiting:
            refs = list(waiting)
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                events += self._answer(ref, *waiting[ref])
        elif timeout:
            time.sleep(timeout)
        return events + self._check_heartbeats()

    def _answer(self, ref: Any, key: str, kind: str) -> list[Event]:
        job = self.jobs[key]
        try:
            answer = self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError as error:
            if kind == "start":
                return self._lost(key, _first_line(error))
            self._poll(job)  # transient (a network blip); a node that stays away trips the heartbeat
            return []
        except self.lost_errors as error:
            return self._lost(key, _first_line(error))
        except self.ray.exceptions.RayError as error:
            self._drop(key)
            return [Exited(key, None, f"Ray error: {_first_line(error)}")]
        if kind == "start":
            return self._started(key, job, answer)
        job.heard_at = time.monotonic()
        events: list[Event] = [Line(key, text) for text in answer["lines"]]
        if answer["done"]:
            self._drop(key)
            return [*events, Exited(key, answer["exit_code"])]
        self._poll(job)
        return events

    def _started(self, key: str, job: _RayJob, info: dict[str, Any]) -> list[Event]:
        job.node, job.start_ref = f"{info['host']} ({info['node']})", None
        if info.get("error"):
            self._drop(key)
            return [Exited(key, None, info["error"])]
        spec = replace(job.planned, gpus=_gpu_records(info))
        env = {**worker_env(spec), **info["env"]}
        header = (
            f"# command: {shlex.join(spec.argv)}",
            f"# env: {shlex.join(f'{k}={v}' for k, v in sorted(env.items()))}",
            f"# ray node: {job.node}, attempt {self.starts[key]}",
        )
        gpus = f" GPU {info['cuda_visible_devices']}," if info["cuda_visible_devices"] else ""
        job.heard_at = time.monotonic()
        self._poll(job)
        return [Started(key, spec, info["pid"], f"on {job.node},{gpus} pid {info['pid']}", header)]

    def _poll(self, job: _RayJob) -> None:
        job.poll_ref = job.actor.poll.remote(BATCH_WAIT_S, BATCH_LINES)

    def _lost(self, key: str, why: str) -> list[Event]:
        node = self.jobs[key].node
        self._drop(key)
        return [Lost(key, why, f" on {node}" if node else "")]

    def _check_heartbeats(self) -> list[Event]:
        events: list[Event] = []
        now = time.monotonic()
        for key, job in list(self.jobs.items()):
            if job.start_ref is not None:
                continue  # not started: Ray may queue it for as long as it takes
            if job.killed_at is not None and now - job.killed_at > KILL_WAIT_S:
                self._drop(key)
                events.append(
                    Exited(
                        key, None, f"no exit confirmed {KILL_WAIT_S:g}s after SIGKILL; its actor was killed"
                    )
                )
            elif now - job.heard_at > HEARTBEAT_S:
                events += self._lost(key, f"no answer from its node for {now - job.heard_at:.0f}s")
        return events

    def signal(self, key: str, signum: int) -> None:
        job = self.jobs.get(key)
        if job is None or job.actor is None:
            return
        job.actor.signal.remote(int(signum))
        if signum == signal.SIGKILL and job.killed_at is None:
            job.killed_at = time.monotonic()

    def cancel(self, key: str) -> None:
        if key in self.jobs:
            self._drop(key)

    def _drop(self, key: str) -> None:
        """Kill the job's actor: its GPUs go back to Ray for the next job."""
        job = self.jobs.pop(key)
        with contextlib.suppress(Exception):
            self.ray.kill(job.actor, no_restart=True)

    def close(self) -> None:
        if self.ray is None:
            return
        running = [job for job in self.jobs.values() if job.poll_ref is not None]
        signals = [job.actor.signal.remote(int(signal.SIGKILL)) for job in running]
        with contextlib.suppress(Exception):
            self.ray.wait(signals, num_returns=len(signals), timeout=5.0)
        for key in list(self.jobs):
            self._drop(key)
        if self.connected_here:
            self.ray.shutdown()
            self.connected_here = False


def worker_env(spec: JobSpec) -> dict[str, str]:
    """What the worker gets on top of its node's environment, before the node adds its GPUs."""
    env = {**BASE_ENV, **spec.env}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # planned for the launcher's host; the node's Ray decides
    return env


def _gpu_records(info: dict[str, Any]) -> tuple[GpuInfo, ...]:
    """The GPUs a node gave a job, for the prefix, the table and summary.json."""
    return tuple(GpuInfo(index=gpu["index"], uuid=gpu["uuid"], name=gpu["name"]) for gpu in info["gpus"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
