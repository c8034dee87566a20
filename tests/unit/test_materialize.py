"""Destinations and meta-model binding, on one process."""

from __future__ import annotations

import pytest
import torch

from distload.errors import DistLoadError
from distload.materialize import (
    bind,
    check_bound,
    model_entries,
    prepare_destinations,
    tie_groups,
)
from distload.placement import TensorParallel
from distload.planner import make_plan
from distload.transforms import Rename
from tests.plans import index_of

SHAPES = [((8, 4), "F32"), ((4,), "BF16")]


def test_fresh_destinations_have_the_local_shape_and_dtype() -> None:
    plan = make_plan(index_of(SHAPES), 2, TensorParallel({"t0": "colwise"}), dtype="BF16")
    dests = prepare_destinations(plan, 1, torch.device("cpu"), None)
    assert dests[0].shape == (4, 4) and dests[0].dtype == torch.bfloat16
    assert dests[1].shape == (4,)


def test_out_tensors_are_checked_and_used_in_place() -> None:
    plan = make_plan(index_of(SHAPES), 1)
    mine = {"t0": torch.empty(8, 4), "t1": torch.empty(4, dtype=torch.bfloat16)}
    dests = prepare_destinations(plan, 0, torch.device("cpu"), mine)
    assert dests[0] is mine["t0"] and dests[1] is mine["t1"]
    with pytest.raises(DistLoadError, match=r"out\['t0'\] on rank 0 has shape \[4, 4\]"):
        prepare_destinations(plan, 0, torch.device("cpu"), {**mine, "t0": torch.empty(4, 4)})
    with pytest.raises(DistLoadError, match="no tensor 't1'"):
        prepare_destinations(plan, 0, torch.device("cpu"), {"t0": mine["t0"]})
    with pytest.raises(DistLoadError, match="meta device"):
        prepare_destinations(
            plan, 0, torch.device("cpu"), {**mine, "t0": torch.empty(8, 4, device="meta")}
        )


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_bind_makes_loaded_pieces_the_parameters_and_keeps_ties() -> None:
    with torch.device("meta"):
        model = _Tied()
    model.scratch = torch.zeros(2)  # a real non-persistent buffer is kept
    entries = model_entries(model)
    groups = tie_groups(entries)
    assert ["emb.weight", "head.weight"] in groups
    plan = make_plan(index_of([((8, 4), "F32")]), 1, transforms=[Rename("^t0$", "emb.weight")])
    value = torch.arange(32.0).reshape(8, 4)
    missing = bind(entries, groups, plan, {"emb.weight": value})
    assert missing == []
    assert model.head.weight is model.emb.weight
    assert model.emb.weight.data_ptr() == value.data_ptr()
    check_bound(entries, missing, strict=True, source="x", skipped=())


def test_missing_parameters_and_meta_buffers_are_errors() -> None:
    with torch.device("meta"):
        model = _Tied()
    entries = model_entries(model)
    plan = make_plan(index_of([((2, 2), "F32")]), 1)
    missing = bind(entries, tie_groups(entries), plan, {})
    assert sorted(missing) == ["emb.weight", "head.weight"]
    with pytest.raises(DistLoadError, match="non-persistent buffer"):
        check_bound(entries, missing, strict=False, source="x", skipped=())
    model.scratch = torch.zeros(2)
    entries = model_entries(model)
    with pytest.raises(DistLoadError, match="lacks 2 tensor"):
        check_bound(entries, missing, strict=True, source="x", skipped=())
    check_bound(entries, missing, strict=False, source="x", skipped=())
