"""Staging arenas: named, reusable buffers of one rank (host, pinned host or device memory).

Used on every rank by the execute phase (the read-ahead ring, the pack and receive buffers).
"""

from __future__ import annotations

import torch

from distload.directio import DIRECT_ALIGN


class Arenas:
    """Named, reusable staging buffers that grow to the largest size asked of them.

    Each name (e.g. ``"read0"``, ``"recv"``) is one buffer reused for every bucket, so a rank's
    staging memory is the sum of its arenas' sizes, bounded by the plan's bucket size.
    Host arenas are pinned when ``pin`` is set (for fast copies to CUDA), and start on a
    ``DIRECT_ALIGN`` boundary: O_DIRECT reads land pieces straight in them.
    """

    def __init__(self, device: torch.device, *, pin: bool = False) -> None:
        self.device = device
        self.pin = pin and device.type == "cpu" and torch.cuda.is_available()
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` backed by arena ``name`` (contents undefined)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(name, None)
            if self.device.type == "cpu":  # one aligned block more, to start on a boundary
                raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=self.pin)
                skip = -raw.data_ptr() % DIRECT_ALIGN
                buf = raw[skip : skip + nbytes]
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._buffers[name] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        """Bytes of all arenas now (their peak, since they never shrink; a host arena also
        holds up to one aligned block before it, to start on a boundary)."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
