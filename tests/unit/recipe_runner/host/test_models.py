"""A hub model is fetched once by the launcher, before any worker starts; offline without a cached copy
the launch stops with exit 2 and writes nothing."""

from __future__ import annotations

import pytest

from recipe_runner.cli.main import main
from recipe_runner.host.models import ModelUnavailable, local_model


def cached_snapshot(cache, repo: str = "someorg/tiny-vl"):
    """A model laid out as huggingface_hub caches it: refs/main names the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    snapshot = root / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    # huggingface_hub reads its environment once, at import: set both, for this process and children.
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_a_cached_snapshot_is_used_and_a_local_dir_is_kept(offline_cache, tmp_path):
    snapshot = cached_snapshot(offline_cache)
    assert local_model("someorg/tiny-vl") == str(snapshot)
    assert local_model(str(tmp_path)) == str(tmp_path)  # a directory is never looked up


def test_offline_without_a_cached_copy_the_launch_stops_before_anything(
    offline_cache, tmp_path, tiny_data_dir, capsys
):
    with pytest.raises(ModelUnavailable):
        local_model("someorg/absent")
    out = tmp_path / "out"
    data = ["--dataset", str(tiny_data_dir)]
    code = main(["--recipes", "r1", "--cpu", "--model-id", "someorg/absent", *data, "--output-dir", str(out)])
    assert code == 2
    assert "--model-id someorg/absent: not in the local Hugging Face cache" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
