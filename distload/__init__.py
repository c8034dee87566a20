"""distload: load safetensors checkpoints into every process of a distributed job, reading
each byte once and moving only what each rank needs.

Public API::

    model = distload.from_pretrained(source, tp_plan="auto")   # a transformers model
    state = distload.load(source, placement=distload.TensorParallel(rules))
    state.report.table()
"""

from distload.api import LoadedState, LoadIntoResult, load, load_into
from distload.errors import CheckpointError, DistLoadError, PeerError, PlacementError
from distload.integrations.transformers import from_pretrained
from distload.placement import (
    DeviceMap,
    ExpertParallel,
    Layout,
    Mesh,
    PipelineParallel,
    Placement,
    ReplicateAll,
    TensorParallel,
    fused_experts,
    preset,
    preset_transforms,
)
from distload.report import LoadReport
from distload.transforms import Merge, Rename, Split, Stack, Transpose

__all__ = [
    "CheckpointError",
    "DeviceMap",
    "DistLoadError",
    "ExpertParallel",
    "Layout",
    "LoadIntoResult",
    "LoadReport",
    "LoadedState",
    "Merge",
    "Mesh",
    "PeerError",
    "PipelineParallel",
    "Placement",
    "PlacementError",
    "Rename",
    "ReplicateAll",
    "Split",
    "Stack",
    "TensorParallel",
    "Transpose",
    "from_pretrained",
    "fused_experts",
    "load",
    "load_into",
    "preset",
    "preset_transforms",
]

__version__ = "0.1.0"
