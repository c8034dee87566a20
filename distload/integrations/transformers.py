"""``distload.from_pretrained``: a transformers model in one call, loaded the distload way.

Collective: every rank of the job calls it with the same arguments. Rank 0 reads the model's
``config.json`` (a local folder, or the Hub at one pinned commit) and shares its bytes; every
rank builds the model on the meta device, applies the tensor-parallel plan with torch's own
``parallelize_module`` (so the model runs: its collectives are DTensor's), then
``distload.load_into`` fills each rank's shard straight from the checkpoint, each byte read
once per job. The model comes back in eval mode, tied weights tied, with
``model.distload_report``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distload import runtime as runtime_mod
from distload.coordination import from_coordinator
from distload.errors import DistLoadError
from distload.hub.options import HubOptions, pin_hub_source
from distload.placement.base import Placement

# transformers' tensor-parallel plan strings this integration maps onto torch's styles
PLAN_STYLES = ("colwise", "rowwise", "colwise_gather_output", "embedding_rowwise", "replicate")


def _config_bytes(source: str | os.PathLike[str], hub: HubOptions) -> bytes:
    """Rank 0: the bytes of the model's ``config.json`` (a local folder or a pinned Hub repo)."""
    resolved = pin_hub_source(source, hub)
    if resolved is None:
        folder = Path(source)
        folder = folder / hub.subfolder if hub.subfolder else folder
        path = folder / "config.json" if folder.is_dir() else folder.parent / "config.json"
        if not path.is_file():
            raise DistLoadError(
                f"{path}: no config.json next to the weights; from_pretrained needs the model's "
                "config (save it with model.save_pretrained or config.save_pretrained), or use "
                "distload.load_into with a model you build",
                file=str(path),
                phase="index",
            )
        return path.read_bytes()
    name = resolved.path("config.json")
    if name not in resolved.files:
        raise DistLoadError(
            f"{resolved.ref.url(resolved.commit)} has no config.json", file="config.json"
        )
    text = hub.client().fetch_small(resolved, name).read_text()
    payload = {"commit": resolved.commit, "config": text}
    return b"H" + json.dumps(payload).encode()


def _config(data: bytes) -> tuple[Any, str | None]:
    """A transformers config from ``config.json`` bytes (and the Hub commit, if any)."""
    from transformers import AutoConfig

    commit = None
    if data[:1] == b"H":
        payload = json.loads(data[1:])
        commit, data = payload["commit"], payload["config"].encode()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_bytes(data)
        return AutoConfig.from_pretrained(folder), commit


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def torch_styles(model: torch.nn.Module, plan: Mapping[str, str]) -> dict[str, Any]:
    """transformers' ``{module pattern: style}`` plan as torch ``ParallelStyle`` s per module
    name of ``model`` (``*`` matches one name part, as in transformers' plans). Embeddings
    follow torch's semantics: ``embedding_rowwise`` shards the vocabulary (``Shard(0)``)."""
    from distload.materialize.dtensor import torch_style
    from distload.placement.tensor_parallel import STRING_RULES

    def style(kind: str) -> Any:
        if kind not in PLAN_STYLES:
            raise DistLoadError(
                f"tensor-parallel style {kind!r} is not supported by distload.from_pretrained; "
                f"supported: {list(PLAN_STYLES)}"
            )
        cut = STRING_RULES[kind]  # what the style shards: "col", "row", "vocab" or "dim"
        return torch_style(kind, cut in ("vocab", "dim"), 0 if cut in ("col", "vocab") else 1)

    names = [n for n, _ in model.named_modules() if n]
    styles: dict[str, Any] = {}
    unmatched = []
    for pattern, kind in plan.items():
        if kind == "replicate":
            continue
        regex = fnmatch.translate(pattern).replace(".*", "[^.]*")
        hits = [n for n in names if re.fullmatch(regex, n)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            styles[name] = style(kind)
    if unmatched:
        raise DistLoadError(
            f"tp_plan entries that match no module of {type(model).__name__}: {unmatched[:5]} "
            "(module paths, e.g. 'model.layers.*.self_attn.q_proj')"
        )
    return styles


def _plan_of(model: torch.nn.Module, tp_plan: Any) -> Mapping[str, str]:
    if tp_plan == "auto":
        plan = getattr(model, "_tp_plan", None) or {}
        if not plan:
            raise DistLoadError(
                f"{type(model).__name__} has no tensor-parallel plan in transformers "
                "(tp_plan='auto' would shard nothing): pass tp_plan={module pattern: style} or "
                "load it replicated (tp_plan=None)"
            )
        return dict(plan)
    if isinstance(tp_plan, Mapping):
        return dict(tp_plan)
    raise DistLoadError(f"tp_plan must be None, 'auto' or a dict, got {type(tp_plan).__name__}")


def _placement(
    model: torch.nn.Module,
    tp_plan: Any,
    device_map: Any,
    max_memory: Mapping[Any, int | str] | None,
    device: torch.device,
) -> tuple[Placement | None, bool]:
    """(placement for load_into, as_dtensor) of from_pretrained's ``tp_plan`` / ``device_map``;
    a transformers plan is applied to ``model`` here (collective: the mesh)."""
    from distload.placement import DeviceMap, TensorParallel

    if isinstance(tp_plan, TensorParallel):  # distload rules: torch's styles from them
        return tp_plan, True
    if tp_plan is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        if not torch.distributed.is_initialized():
            raise DistLoadError("tp_plan needs a process group (launch with torchrun, srun ...)")
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        parallelize_module(model, mesh, torch_styles(model, _plan_of(model, tp_plan)))
        return None, False
    if isinstance(device_map, DeviceMap):
        return device_map, False
    if device_map is not None:
        return DeviceMap(device_map, max_memory=max_memory), False
    return None, False


def from_pretrained(
    source: str | os.PathLike[str],
    *,
    model_class: Any = None,
    tp_plan: Any = None,
    device_map: Any = None,
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: Any = "auto",
    torch_dtype: Any = None,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    device: str | torch.device | None = None,
    group: Any = None,
    **load_kwargs: Any,
) -> torch.nn.Module:
    """A transformers model, loaded with distload: ``AutoModel*.from_pretrained`` in one call.

    Collective (every rank, same arguments). ``tp_plan="auto"`` applies the model's own
    transformers plan (``model._tp_plan``), a dict applies one in transformers' format
    (``{"model.layers.*.self_attn.q_proj": "colwise", ...}``), a
    :class:`~distload.TensorParallel` its rules (``load_into(as_dtensor=True)``); parameters
    become DTensors on a 1-d mesh over the world and the model runs tensor parallel.
    ``device_map`` takes distload's ``DeviceMap`` forms (``"auto"``, ``"balanced_low_0"``,
    ``{prefix: rank}``) with ``max_memory`` (``{rank or "cpu": "10GiB"}``): whole modules of
    the model (its ``_no_split_modules``) per rank, tied weights on every rank that uses them,
    the result in ``model.hf_device_map``. ``dtype="auto"`` keeps the
    checkpoint's dtypes (``torch_dtype=`` is accepted as the older name). Other keywords go to
    :func:`distload.load_into` (``timeout``, ``staging_bytes``, ...).

    Example:
        >>> model = distload.from_pretrained("ckpt/", tp_plan="auto")  # doctest: +SKIP
        >>> model.distload_report.table()                              # doctest: +SKIP
    """
    from accelerate import init_empty_weights

    from distload.api import load_into

    if torch_dtype is not None:
        dtype = torch_dtype
    if tp_plan is not None and device_map is not None:
        raise DistLoadError("pass tp_plan= or device_map=, not both")
    timeout = float(load_kwargs.get("timeout", 300.0))
    rt, net = runtime_mod.setup(group, device, timeout=timeout)
    hub = HubOptions(revision=revision, subfolder=subfolder, cache_dir=load_kwargs.get("cache_dir"))
    config, commit = _config(from_coordinator(net, "index", lambda: _config_bytes(source, hub)))
    cls = _model_class(config, model_class)
    with init_empty_weights():  # parameters on meta, buffers real
        model = cls(config)
    placement, as_dtensor = _placement(model, tp_plan, device_map, max_memory, rt.device)
    result = load_into(
        model,
        source,
        placement,
        dtype=None if dtype == "auto" else dtype,
        device=rt.device,
        group=group,
        revision=commit or revision,
        subfolder=subfolder,
        as_dtensor=as_dtensor,
        variant=variant,
        **load_kwargs,
    )
    model.eval()
    model.distload_report = result.report  # type: ignore[assignment]
    return model
