"""Transports: how buffers move between ranks (torch.distributed, single process)."""

from distload.transport.base import Transport
from distload.transport.local import LocalTransport

__all__ = ["LocalTransport", "Transport"]
