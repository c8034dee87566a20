"""Per-rank accounting of a plan: reads add up to the checkpoint, holdings to each part."""

from __future__ import annotations

import pytest

from distload.accounting import traffic
from distload.placement import TensorParallel
from distload.planner import make_plan
from tests.plans import index_of

SHAPES = [((64, 16), "BF16"), ((16,), "F32"), ((16, 43), "BF16"), ((5, 3), "I64")]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_reads_add_up_and_receivers_get_what_others_send(world: int) -> None:
    index = index_of(SHAPES)
    plan = make_plan(index, world, TensorParallel({"t0": "colwise", "t2": "rowwise"}))
    stats = traffic(plan, multicast=False)
    assert sum(s.read for s in stats) == index.total_bytes
    assert sum(s.sent for s in stats) == sum(s.received for s in stats)
    for s in stats:
        held = 0
        for out, output in enumerate(plan.outputs):
            shape = plan.local_shape(out, s.rank)
            if shape is not None:
                itemsize = (
                    2 if plan.dtypes[out] == "BF16" else (4 if plan.dtypes[out] == "F32" else 8)
                )
                n = 1
                for d in shape:
                    n *= d
                held += n * itemsize
        assert s.held == held, s
