"""Machine-readable progress lines shared by the worker (writes) and the launcher (reads).

Torch-free. A worker prints one line per event on stdout:

    RR_PROGRESS {"event": "step", "recipe": "r1-llm-only", "stage": "main", "step": 3, ...}

beside its ordinary human log lines. The launcher's status table reads only these lines,
never free text. Under data parallelism only rank 0 prints (the worker turns `ENABLED` off on the
others), so the launcher sees one run. Events and their keys:

  start     recipe, stage, device ("cuda" | "cpu"), device_name, device_uuid, pid, world_size
  step      recipe, stage, step, total, loss, lr, epoch, gpu_mem_gib (None on CPU)
  stage_end recipe, stage, final_loss, output
  eval      stage ("eval" | "baseline"), split ("test" | "validation" | ...), done, total, elapsed_s,
            images_per_s (at most one a second)
  end       recipe, status ("succeeded" | "failed"), final_loss, exit_code, error
"""

from __future__ import annotations

import json
import sys
from typing import Any

PREFIX = "RR_PROGRESS "
ENABLED = True  # False on data-parallel ranks other than 0: one process speaks for the run


def format_event(event: str, **fields: Any) -> str:
    return PREFIX + json.dumps({"event": event, **fields}, sort_keys=True, default=str)


def emit(event: str, **fields: Any) -> None:
    """Print one progress line and flush, so a piped parent sees it at once."""
    if not ENABLED:
        return
    print(format_event(event, **fields), file=sys.stdout, flush=True)


def parse_line(line: str) -> dict[str, Any] | None:
    """The event carried by a log line, or None for an ordinary line."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
