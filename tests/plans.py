"""Helpers shared by the planner, transform and shared-memory tests: synthetic indexes of plain
shapes, and checks of a plan's geometry on integer grids (no files, no processes)."""

from __future__ import annotations

import math
from collections import Counter

from distload.dtypes import ITEMSIZE
from distload.geometry import piece_bytes, segments_for
from distload.index import CheckpointIndex, FileMeta, TensorMeta
from distload.placement import local_box
from distload.plan import LoadPlan


def index_of(shapes: list[tuple[tuple[int, ...], str]], files: int = 2) -> CheckpointIndex:
    """An index of tensors t0, t1, ... of these (shape, dtype), spread over ``files`` files."""
    tensors = []
    offsets = [100] * files
    for i, (shape, dtype) in enumerate(shapes):
        f = i % files
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors.append(TensorMeta(f"t{i}", f"f{f}.safetensors", dtype, shape, offsets[f], nbytes))
        offsets[f] += nbytes
    fmetas = tuple(FileMeta(f"f{f}.safetensors", offsets[f], 100) for f in range(files))
    tensors.sort(key=lambda t: (t.file, t.offset))
    return CheckpointIndex("/ckpt", fmetas, tuple(tensors), {})


def file_ranges(plan: LoadPlan) -> Counter[tuple[str, int]]:
    """How many times each byte of each file is read (by any rank)."""
    reads: Counter[tuple[str, int]] = Counter()
    for bucket in plan.buckets:
        for item in bucket.items:
            meta = plan.tensors[item.tensor]
            start = meta.offset + (item.start * meta.row_bytes if meta.shape else 0)
            for b in range(start, start + piece_bytes(meta, item)):
                reads[(meta.file, b)] += 1
    return reads


def simulate(plan: LoadPlan) -> None:
    """Run the plan's geometry on integer grids: every local element written exactly once."""
    world = plan.world_size
    for rank in range(world):
        writes: dict[int, Counter[tuple[int, ...]]] = {}
        for bucket in plan.buckets:
            if bucket.kind == "local" and bucket.reader != rank:
                continue
            segs, size = segments_for(plan, bucket, rank)
            for seg in segs:
                assert seg.offset % 64 == 0 and seg.offset + seg.nbytes <= size
                counter = writes.setdefault(seg.part.output, Counter())
                ranges = [range(a, b) for a, b in seg.part.dst]
                for idx in _product(ranges):
                    counter[idx] += 1
        for t, meta in enumerate(plan.outputs):
            box = local_box(meta.shape, plan.layouts[t], rank)
            if box is None:
                assert t not in writes
                continue
            local = [range(0, b - a) for a, b in box]
            expected = Counter(_product(local))
            assert writes.get(t, Counter()) == expected, (rank, meta.name)


def _product(ranges: list[range]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*o, i) for o in out for i in r]
    return out
