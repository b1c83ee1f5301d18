"""The Ray actor that runs one worker on its node: shipped by value, so a node needs only Ray and Python.

A class defined inside a function is pickled with its code, so a node needs neither `recipe_runner` on
its path nor anything but the standard library and Ray to run it. Its methods therefore use only those.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any


def job_actor_class() -> type:
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
            """Runs in the worker between fork and exec: no signal blocked or ignored (Ray's threads block
            SIGINT, and a blocked mask or an ignored signal survives exec, so the worker would never see a
            Ctrl-C), and SIGKILL for the worker when this actor dies (killed, or its node's Ray stopped)."""
            prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
            parent = os.getpid()

            def hook() -> None:
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                # An ignored signal stays ignored across exec: the worker must see Ctrl-C and SIGTERM.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if prctl is not None:
                    prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the actor died before prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)

            return hook

        @staticmethod
        def _describe_gpus(ids: list[str]) -> list[dict[str, Any]]:
            """Index, UUID and name of each GPU Ray gave, from NVML when the node has it."""
            found: list[dict[str, Any]] = [
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
