"""DTensors in and out: wrap local pieces as DTensors with a model's or a TP layout's mesh.

Runs on every rank of the load; building a mesh (:func:`tp_mesh`) is collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distload.errors import DistLoadError
from distload.placement.from_model import FromModel, loaded_dtensor, mesh_specs_of


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, without importing ``torch.distributed.tensor``
    (:func:`~distload.placement.from_model.loaded_dtensor`)."""
    module = loaded_dtensor()
    return module is not None and isinstance(tensor, module.DTensor)


def as_dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a DTensor with the mesh, placements and global shape of ``like``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        raise TypeError(f"expected a DTensor to copy the layout of, got {type(like).__name__}")
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def tp_mesh(device_type: str, world: int, tp: int) -> Any:
    """A (dp, tp) DeviceMesh over the world (collective: every rank calls it, same order)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world % tp:
        raise DistLoadError(f"world_size({world}) % tp({tp}) = {world % tp}")
    if world // tp > 1:
        return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))


def parallelize(model: torch.nn.Module, placement: Any, device: Any) -> None:
    """``parallelize_module`` ``model`` (on meta) with the torch styles of a TensorParallel
    placement, on the ``tp`` dim of a ``(dp, tp)`` mesh over the world (collective)."""
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import parallelize_module

    world = dist.get_world_size()
    if device is not None:
        kind = torch.device(device).type
    else:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = tp_mesh(kind, world, placement.size or world)
    parallelize_module(model, mesh["tp"], tp_styles(model, placement, world))


# transformers' style names whose torch style gathers the output / takes a replicated input
_GATHERED = ("colwise_gather_output", "colwise_rep")
_REPLICATED_INPUT = ("rowwise_split_input", "rowwise_rep")


def torch_style(kind: str, embedding: bool, shard_dim: int) -> Any:
    """torch's ``ParallelStyle`` for a Linear (or Embedding) sharded along ``shard_dim`` of its
    weight under a rule named ``kind`` (a transformers style name, or "" for a ``Shard``)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if embedding:  # the looked-up rows go on as one replicated hidden state
        if shard_dim == 0:
            return RowwiseParallel(input_layouts=Replicate())
        return ColwiseParallel(output_layouts=Replicate())
    if shard_dim == 0:
        return (
            ColwiseParallel(output_layouts=Replicate()) if kind in _GATHERED else ColwiseParallel()
        )
    if kind in _REPLICATED_INPUT:
        return RowwiseParallel(input_layouts=Replicate())
    return RowwiseParallel()


def tp_styles(model: torch.nn.Module, placement: Any, world: int) -> dict[str, Any]:
    """Module path -> torch style for every Linear / Embedding whose weight ``placement`` (a
    :class:`~distload.TensorParallel`) shards; a sharded tensor of any other module is an
    error (torch has no style that would run it)."""
    from distload.index import TensorMeta

    styles: dict[str, Any] = {}
    for path, module in model.named_modules():
        runnable = isinstance(module, torch.nn.Linear | torch.nn.Embedding)
        for attr, param in module.named_parameters(recurse=False):
            name = f"{path}.{attr}" if path else attr
            meta = TensorMeta(name, "", "F32", tuple(param.shape), 0, 0)
            layout = placement.layout(meta, world)
            if layout.dim is None or (runnable and attr != "weight"):
                continue
            if not runnable:
                raise DistLoadError(
                    f"as_dtensor=True: {name!r} would be sharded, but its module "
                    f"{type(module).__name__} is no nn.Linear or nn.Embedding, which torch's "
                    "parallel styles run; parallelise the meta model yourself (load_into then "
                    "loads its DTensors) or load without as_dtensor",
                    tensor=name,
                )
            found = placement.match(name)
            kind = found[1] if found is not None and isinstance(found[1], str) else ""
            styles[path] = torch_style(kind, isinstance(module, torch.nn.Embedding), layout.dim)
    return styles


def dtensor_outputs(
    out: Mapping[str, torch.Tensor] | None,
) -> tuple[Mapping[str, torch.Tensor] | None, dict[str, Any]]:
    """``out=`` with each DTensor replaced by its local tensor (written in place), and the
    DTensors by name (to check their global shapes and hand them back)."""
    if out is None:
        return None, {}
    dtensors = {name: t for name, t in out.items() if is_dtensor(t)}
    if not dtensors:
        return out, {}
    local = {name: (t._local_tensor if name in dtensors else t) for name, t in out.items()}  # type: ignore[attr-defined]
    return local, dtensors


def check_dtensor_shapes(dtensors: Mapping[str, Any], plan: Any, rank: int) -> None:
    """Each out= DTensor's global shape is its checkpoint tensor's."""
    full = {o.name: o.shape for o in plan.outputs}
    for name, tensor in dtensors.items():
        if name in full and tuple(tensor.shape) != tuple(full[name]):
            raise DistLoadError(
                f"out[{name!r}] on rank {rank} is a DTensor of global shape "
                f"{list(tensor.shape)}, but the checkpoint's tensor has {list(full[name])}",
                tensor=name,
            )


def check_dtensor_request(as_dtensor: bool, placement: Any, group: Any) -> None:
    from distload.placement.tensor_parallel import TensorParallel

    if as_dtensor and not isinstance(placement, TensorParallel):
        raise DistLoadError(
            "as_dtensor=True needs a TensorParallel placement (models whose parameters are "
            "already DTensors are loaded as DTensors without it)"
        )
    if as_dtensor and (group is not None or not torch.distributed.is_initialized()):
        raise DistLoadError("as_dtensor=True needs an initialised world process group")


def placement_of_dtensors(named: Mapping[str, Any], group: Any) -> Any:
    """The placement DTensors already have (model entries or out= tensors; None: none are)."""
    group_rank_of = None
    if group is not None:
        group_rank_of = {
            g: torch.distributed.get_group_rank(group, g)
            for g in torch.distributed.get_process_group_ranks(group)
        }
    tensors = {n: getattr(e, "tensor", e) for n, e in named.items()}
    specs = mesh_specs_of(tensors, group_rank_of)
    return FromModel(specs) if specs else None
