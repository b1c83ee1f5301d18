"""Exit codes: what a worker's (and every command's) exit status means, read by the launcher's policy.

Torch-free; the one place these numbers are written.
"""

from __future__ import annotations

OK = 0
FAILED = 1
USAGE = 2  # bad usage or bad input: nothing started, nothing written
OOM = 3  # CUDA out of memory: the launcher may retry with half the micro-batch, or alone on a GPU
INTERRUPTED = 130  # SIGINT or SIGTERM (a launch stopped by signal N exits 128 + N)


def worst(codes: list[int]) -> int:
    """The exit code of several runs: usage errors first, then the highest."""
    return max(codes, key=lambda code: (code == USAGE, code)) if codes else OK
