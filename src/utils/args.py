"""Argument types shared by the command lines (torch-free: the launcher imports it)."""

from __future__ import annotations

import argparse


def int_or_auto(text: str) -> int | str:
    """argparse type for flags like --batch-size that take a whole number or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or auto") from None
