"""The options of one load, as one frozen object (built from ``distload.load``'s keywords).

Every rank builds its own from its own arguments; only rank 0's choices that change the plan
travel (inside the plan), so ranks never disagree on which collectives run. Choices read from
the environment (``DISTLOAD_CHECK_EVERY``, ``DISTLOAD_MULTICAST``) are read by the coordinator
alone (:func:`coordinator_knobs`) and carried in the plan.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from distload.checkpoint import DEFAULT_MAX_HEADER_BYTES
from distload.dtypes import parse_dtype
from distload.errors import DistLoadError, PlacementError
from distload.execute import STAGING_ARENAS
from distload.hub.options import HubOptions
from distload.plan import CHECK_EVERY
from distload.planner import DEFAULT_BUCKET_BYTES
from distload.storage import DEFAULT_READ_THREADS
from distload.transforms import Transform

# staging of the default bucket size (96 MiB): buckets are staging_bytes / STAGING_ARENAS
DEFAULT_STAGING_BYTES = STAGING_ARENAS * DEFAULT_BUCKET_BYTES

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadOptions:
    """Everything a load carries besides its source, placement and destinations."""

    dtype: str | None = None  # destination dtype of floating tensors (safetensors name)
    staging_bytes: int = DEFAULT_STAGING_BYTES
    bucket_bytes: int | None = None  # default: staging_bytes / STAGING_ARENAS
    readers: Collection[int] | None = None
    timeout: float = 300.0
    read_threads: int = DEFAULT_READ_THREADS
    direct_io: bool = True  # O_DIRECT for blocks the page cache lacks (distload.storage)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    keys: Collection[str] | None = None
    transforms: Sequence[Transform] = ()
    transport: str = "auto"
    verify: bool | str | os.PathLike[str] = False
    allow_pickle: bool = False
    shm: bool | None = None
    hub: HubOptions = field(default_factory=HubOptions)
    progress: Progress | None = None
    download_progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.staging_bytes < STAGING_ARENAS:
            raise DistLoadError(
                f"staging_bytes must be >= {STAGING_ARENAS}, got {self.staging_bytes}"
            )

    @staticmethod
    def from_arguments(given: Mapping[str, Any]) -> LoadOptions:
        """The options among the keyword arguments of ``distload.load`` (by name; the Hub
        keywords become :class:`HubOptions`, ``dtype`` is parsed)."""
        own = {f.name for f in fields(LoadOptions)} - {"hub", "dtype"}
        hub_names = {f.name for f in fields(HubOptions)} - {"endpoint"}
        hub_given = {k: v for k, v in given.items() if k in hub_names}
        hub_given["extra_files"] = tuple(hub_given.get("extra_files", ()))
        hub = HubOptions(**hub_given)
        picked = {k: v for k, v in given.items() if k in own}
        picked["transforms"] = tuple(picked.get("transforms", ()))
        return LoadOptions(dtype=parse_dtype(given.get("dtype")), hub=hub, **picked)

    @property
    def bucket(self) -> int:
        """Bytes of one bucket."""
        return self.bucket_bytes or max(1, self.staging_bytes // STAGING_ARENAS)


@dataclass(frozen=True)
class CoordinatorKnobs:
    """Choices the coordinator reads from its environment and puts in the plan."""

    check_every: int = CHECK_EVERY
    multicast: bool = True
    page_cache: str = "auto"  # "auto": files found cached; "0": never; "force": every file


def coordinator_knobs() -> CoordinatorKnobs:
    """Rank 0 only: ``DISTLOAD_CHECK_EVERY`` (shared buckets between status checks),
    ``DISTLOAD_MULTICAST=0`` (no transport sub-groups) and ``DISTLOAD_PAGE_CACHE``: ``0``
    (shared buckets through slots always), ``force`` (every file taken as cached: same bytes,
    for tests of that path), default ``auto`` (the files found cached)."""
    every = os.environ.get("DISTLOAD_CHECK_EVERY")
    try:
        check_every = max(1, int(every)) if every is not None else CHECK_EVERY
    except ValueError:
        raise DistLoadError(
            f"DISTLOAD_CHECK_EVERY must be an integer, got {every!r}", phase="plan"
        ) from None
    return CoordinatorKnobs(
        check_every=check_every,
        multicast=os.environ.get("DISTLOAD_MULTICAST", "1") != "0",
        page_cache=_page_cache_mode(os.environ.get("DISTLOAD_PAGE_CACHE", "auto")),
    )


def _page_cache_mode(text: str) -> str:
    if text in ("auto", "1", ""):
        return "auto"
    if text in ("0", "force"):
        return text
    raise DistLoadError(f"DISTLOAD_PAGE_CACHE must be auto, 0 or force, got {text!r}", phase="plan")


def check_arguments(placement: object, out: object, device: object) -> None:
    """Arguments of the wrong kind, refused on the calling rank before any collective (every
    rank of a job normally passes the same, so every rank raises the same)."""
    if placement is not None and not (
        callable(getattr(placement, "layouts", None))
        and callable(getattr(placement, "describe", None))
    ):
        hint = ""
        if isinstance(placement, Mapping):
            hint = " (a dict of rules? wrap it: distload.TensorParallel(rules))"
        raise PlacementError(
            f"placement must be a placement object -- ReplicateAll, TensorParallel, "
            f"PipelineParallel, DeviceMap, Mesh, ExpertParallel -- or None; got "
            f"{type(placement).__name__} {str(placement)[:80]!r}{hint}"
        )
    if out is not None and not isinstance(out, Mapping):
        raise DistLoadError(f"out= must map names to tensors, got {type(out).__name__}")
    if out is not None:
        import torch

        for name, tensor in out.items():
            if not isinstance(tensor, torch.Tensor):
                raise DistLoadError(
                    f"out[{name!r}] is {type(tensor).__name__}, not a torch.Tensor",
                    tensor=str(name),
                )
    if device is not None:
        check_device(device)


def check_device(device: object) -> None:
    """A device distload can load into on this build, or a ValueError saying why not."""
    import torch

    try:
        dev = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device ({str(exc)[:120]}); use 'cpu', 'cuda' "
            "or 'cuda:N'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}: CUDA is not available in this build of torch "
                f"({torch.__version__}) or on this machine; use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device={device!r}: distload loads into 'cpu' or 'cuda' memory")
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data; build the model on meta and use load_into")
