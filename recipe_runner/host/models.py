"""A model's files on this host: the hub cache's snapshot of a model id, its config alone for the planner,
or the whole model downloaded once by the launcher before any worker starts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

PLANNER_FILES = ("config.json", "preprocessor_config.json")  # all the planner reads of a model


def model_dir_for(model_id: str, fetch: bool = False) -> Path | None:
    """A directory holding the model's config.json: the local path, or the hub cache's snapshot; with
    `fetch`, a hub model's PLANNER_FILES are downloaded into that cache when missing (never the weights).
    """
    path = Path(model_id)
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if not fetch or path.exists() or model_id.startswith((".", "/")):
        return None
    try:
        found = [hf_hub_download(model_id, name) for name in PLANNER_FILES[:1]]
        with contextlib.suppress(Exception):  # a model without a processor config plans with Qwen's limits
            hf_hub_download(model_id, PLANNER_FILES[1])
    except Exception:  # offline, unknown id, gated: the caller says what to do
        return None
    return Path(found[0]).parent


# What a worker loads of a hub model: weights, configs, tokenizer and chat template (no duplicate .bin).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class ModelUnavailable(RuntimeError):
    """A hub model that is neither in the local cache nor downloadable now."""


def local_model(model_id: str) -> str:
    """A local directory for `model_id`: the path itself, or the hub snapshot, downloaded once here (with
    the hub's own progress) so that every worker loads the same files and none downloads its own.

    Offline (HF_HUB_OFFLINE=1, or no network) a cached snapshot is used; ModelUnavailable otherwise.
    """
    if Path(model_id).is_dir() or model_id.startswith((".", "/")):
        return model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, allow_patterns=MODEL_FILES)
    except Exception as online_error:  # offline, unknown id, gated, no space: try the cache alone
        try:
            return snapshot_download(model_id, allow_patterns=MODEL_FILES, local_files_only=True)
        except Exception:
            raise ModelUnavailable(f"{type(online_error).__name__}: {online_error}") from None
