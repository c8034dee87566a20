"""The load's progress callback counts bytes of the checkpoint, as the CLI's bar shows them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import distload


def test_progress_counts_bytes_up_to_the_checkpoint_size(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.full((64, 64), float(i)) for i in range(6)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    calls: list[tuple[int, int]] = []
    distload.load(
        tmp_path, device="cpu", bucket_bytes=20_000, progress=lambda d, t: calls.append((d, t))
    )
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(calls) > 3  # one call per bucket, several buckets
    assert {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total
