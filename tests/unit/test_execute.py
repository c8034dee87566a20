"""The executor's reader thread on one process: buckets whose pieces are read straight into
their destinations need no staging arena, so the reader runs ahead through them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distload.checkpoint import read_checkpoint
from distload.execute import PREFETCH_DEPTH, Executor, Read, ReadAhead
from distload.materialize import prepare_destinations
from distload.planner import make_plan
from distload.storage import Arenas, FileReader
from distload.synthetic import LlamaShape, write_llama
from distload.transport.local import LocalTransport

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("ckpt"), LlamaShape(), max_shard_bytes=100_000)


def test_direct_buckets_are_read_ahead_without_waiting_for_arenas(ckpt: Path) -> None:
    index = read_checkpoint(ckpt)
    plan = make_plan(index, 1, bucket_bytes=8192)  # one process: every bucket is local
    assert len(plan.buckets) > 4 * PREFETCH_DEPTH
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    with FileReader(ckpt, threads=2) as reader:
        executor = Executor(
            plan, LocalTransport(), dests, reader, host_arenas=arenas, comm_arenas=arenas
        )
        prefetch = ReadAhead(
            plan,
            0,
            reader=reader,
            arenas=arenas,
            direct_targets=executor.copier.direct_targets,
        )
        try:
            # nothing is ever released: a bucket needing an arena would block after
            # PREFETCH_DEPTH of them; direct buckets all come through
            got = [prefetch.next(b) for b in plan.buckets]
        finally:
            prefetch.stop()
    assert all(isinstance(r, Read) and r.arena is None and r.buffer is None for r in got)
    expected: dict[str, torch.Tensor] = {}
    for f in index.files:
        expected.update(load_file(ckpt / f.name))
    for out, dest in dests.items():
        name = plan.outputs[out].name
        assert torch.equal(dest.view(torch.uint8), expected[name].view(torch.uint8)), name
