"""Placements: how each tensor is laid out over the ranks."""

from distload.placement.base import REPLICATED, Layout, Placement, ReplicateAll, local_box
from distload.placement.device_map import DeviceMap
from distload.placement.mesh import ExpertParallel, Mesh
from distload.placement.pipeline import PipelineParallel
from distload.placement.presets import (
    fused_experts,
    preset,
    preset_transforms,
    presets,
    register_preset,
)
from distload.placement.tensor_parallel import TensorParallel

__all__ = [
    "REPLICATED",
    "DeviceMap",
    "ExpertParallel",
    "Layout",
    "Mesh",
    "PipelineParallel",
    "Placement",
    "ReplicateAll",
    "TensorParallel",
    "fused_experts",
    "local_box",
    "preset",
    "preset_transforms",
    "presets",
    "register_preset",
]
