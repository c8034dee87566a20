"""distload inside an existing training script: subgroups, concurrent loads, a training step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.distributed.cases import SHAPE
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(240)


def test_load_into_on_subgroups_then_train(tiny_ckpt: Path) -> None:
    results = check_all_ok(
        run_group(4, "training_step", {"source": str(tiny_ckpt), "shape": SHAPE})
    )
    for r in results:
        assert r["group_size"] == 2
        assert sum(r["read"]) == r["total"]  # each subgroup read the checkpoint once
        assert math.isfinite(r["loss"])
        assert r["params"] >= 17  # parameters the forward uses got gradients ...
        assert r["changed"] == r["params"]  # ... and every one of them took a step
    # the two subgroups are data-parallel replicas: same loss
    assert results[0]["loss"] == pytest.approx(results[2]["loss"])
