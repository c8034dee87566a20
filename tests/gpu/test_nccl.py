"""NCCL/CUDA path: loads into CUDA destinations through pinned staging (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distload
from tests.reference import expected_local, read_all, same_bits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]


def test_single_gpu_load_is_bit_exact(mixed_ckpt: Path) -> None:
    state = distload.load(mixed_ckpt, device="cuda")
    for name, full in read_all(mixed_ckpt).items():
        assert state[name].device.type == "cuda"
        assert same_bits(state[name].cpu(), full), name


def test_single_gpu_cast_into_out(mixed_ckpt: Path) -> None:
    ref = read_all(mixed_ckpt)
    out = {
        n: torch.empty(
            t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="cuda"
        )
        for n, t in ref.items()
    }
    distload.load(mixed_ckpt, dtype=torch.float32, out=out)
    for name, full in ref.items():
        assert same_bits(out[name].cpu(), expected_local(full, name, [], 1, 0, torch.float32))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_tp_load(mixed_ckpt: Path) -> None:
    from tests.distributed.cases import MIXED_RULES
    from tests.distributed.launch import check_all_ok, run_group

    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES, "device": "cuda"}
    check_all_ok(
        run_group(
            2,
            "matrix",
            {"configs": [cfg]},
            bootstrap="env",
            extra_env={
                "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(torch.cuda.device_count()))
            },
        )
    )


def test_single_gpu_small_buckets_reuse_pinned_arenas(mixed_ckpt: Path) -> None:
    """Many buckets through two pinned arenas: an arena is refilled only after the asynchronous
    copies out of it have run (a race here would corrupt later tensors)."""
    ref = read_all(mixed_ckpt)
    for _ in range(3):
        state = distload.load(mixed_ckpt, device="cuda", bucket_bytes=4096)
        assert state.plan is not None and len(state.plan.buckets) > 8
        for name, full in ref.items():
            assert same_bits(state[name].cpu(), full), name
