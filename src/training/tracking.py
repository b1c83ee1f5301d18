"""Weights & Biases for a worker: on by default, offline when there is no key or network, never fatal."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
SECRET_ENV = ("WANDB_API_KEY",)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def start_wandb(run_name: str, output_dir: str, config: dict) -> bool:
    """Start a W&B run for this stage; True when the trainer should report to it."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; training without it")
        return False
    if not _has_credentials() and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        log.info("no W&B key found: logging offline to %s (sync later with `wandb sync`)", output_dir)
        os.environ["WANDB_MODE"] = "offline"
    for mode in (os.environ.get("WANDB_MODE"), "offline"):
        try:
            wandb.init(
                project=os.environ.get("WANDB_PROJECT", "recipe-runner"),
                name=run_name,
                dir=output_dir,
                config=config,
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
            return True
        except Exception as error:  # network, auth, service start: none may fail the run
            log.warning("W&B start failed in mode %s (%s)", mode, type(error).__name__)
    log.warning("training without W&B")
    return False


def finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception as error:  # a failed upload must not turn a finished run into a failure
        log.warning("W&B finish failed (%s)", type(error).__name__)
