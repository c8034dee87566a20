"""The options object of a load and the coordinator's environment knobs."""

from __future__ import annotations

import pytest
import torch

from distload.errors import DistLoadError
from distload.options import DEFAULT_STAGING_BYTES, LoadOptions, coordinator_knobs
from distload.plan import CHECK_EVERY


def test_from_arguments_picks_options_and_hub_keywords_by_name() -> None:
    given = {
        "source": "ckpt/",
        "dtype": torch.bfloat16,
        "staging_bytes": 10 * 2**20,
        "timeout": 7.0,
        "transforms": [],
        "revision": "v1",
        "extra_files": ["config.json"],
        "out": None,
    }
    options = LoadOptions.from_arguments(given)
    assert options.dtype == "BF16" and options.timeout == 7.0
    assert options.bucket == 10 * 2**20 // 6  # a sixth of the staging bound
    assert options.hub.revision == "v1" and options.hub.extra_files == ("config.json",)
    assert options.transforms == ()


def test_defaults_and_bounds() -> None:
    assert LoadOptions().staging_bytes == DEFAULT_STAGING_BYTES
    assert LoadOptions(bucket_bytes=123).bucket == 123
    with pytest.raises(DistLoadError, match="staging_bytes must be >= 6"):
        LoadOptions(staging_bytes=5)


def test_coordinator_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTLOAD_CHECK_EVERY", raising=False)
    monkeypatch.delenv("DISTLOAD_MULTICAST", raising=False)
    assert coordinator_knobs().check_every == CHECK_EVERY and coordinator_knobs().multicast
    monkeypatch.setenv("DISTLOAD_CHECK_EVERY", "0")
    monkeypatch.setenv("DISTLOAD_MULTICAST", "0")
    assert coordinator_knobs().check_every == 1 and not coordinator_knobs().multicast
    monkeypatch.setenv("DISTLOAD_CHECK_EVERY", "often")
    with pytest.raises(DistLoadError, match="DISTLOAD_CHECK_EVERY must be an integer"):
        coordinator_knobs()
