"""Command-line arguments shared by ``distload plan`` and ``distload load``: placements, Hub."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from distload.errors import DistLoadError
from distload.placement import (
    DeviceMap,
    ExpertParallel,
    Mesh,
    TensorParallel,
    preset,
    preset_transforms,
    presets,
)
from distload.placement.base import Placement
from distload.planner import DEFAULT_BUCKET_BYTES

log = logging.getLogger("distload")


def dtype_arg(text: str) -> str:
    """A ``--dtype`` value, or a clear argparse error listing the choices."""
    from distload.dtypes import parse_dtype

    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    name = aliases.get(text.lower(), text)
    try:
        parse_dtype(name)
    except Exception:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; valid: bfloat16 (bf16), float16 (fp16), float32 (fp32), "
            "float64, auto"
        ) from None
    return name


def parse_rule(text: str) -> tuple[str, Any]:
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"rule {text!r} must be PATTERN=SPEC")
    if spec.startswith("shard"):
        from torch.distributed.tensor import Shard

        try:
            return pattern, Shard(int(spec[len("shard") :].strip("():")))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad shard spec {spec!r}; use shard0, shard1 ..."
            ) from None
    from distload.placement.tensor_parallel import STRING_RULES

    if spec in STRING_RULES:
        return pattern, spec
    raise argparse.ArgumentTypeError(
        f"unknown spec {spec!r}; valid: {', '.join(STRING_RULES)}, shardN"
    )


def device_map(text: str) -> str | dict[str, Any]:
    """``--device-map``: a strategy name or a JSON object (module prefix -> rank or "cpu")."""
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        mapping = json.loads(text)
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(
            f"--device-map {text!r}: use auto, balanced, balanced_low_0, sequential or a JSON "
            "object"
        )
    return mapping


def max_memory(text: str) -> dict[str, str]:
    """``--max-memory 0=10GiB,1=10GiB,cpu=40GiB``: limits per rank (or cpu) for device maps."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(
                f"--max-memory {part!r}: expected RANK=SIZE or cpu=SIZE, e.g. 0=10GiB,cpu=40GiB"
            )
        out[key.strip()] = value.strip()
    return out


def transforms_of(args: argparse.Namespace) -> list[Any]:
    return preset_transforms(args.preset) if getattr(args, "preset", None) else []


def placement_of(args: argparse.Namespace) -> Placement | None:
    limits, whole = getattr(args, "max_memory", None), getattr(args, "no_split", None)
    if args.device_map is None and (limits or whole):
        raise DistLoadError("--max-memory and --no-split go with --device-map")
    if args.device_map is not None:
        return DeviceMap(args.device_map, max_memory=limits, no_split=whole or ())
    rules: dict[str, Any] = {}
    for pattern, spec in args.rule or []:
        rules[pattern] = spec
    if args.preset:
        rules.update(preset(args.preset))
    if args.ep is not None or args.expert_tp is not None:
        if args.pp is None and args.dp is None and args.tp is None:
            # over the whole group: the group size is known only when the load runs
            return ExpertParallel(args.ep, tp_rules=rules, expert_tp=args.expert_tp or 1)
        return Mesh(
            dp=args.dp or 1,
            pp=args.pp or 1,
            tp=args.tp or 1,
            tp_rules=rules,
            ep=args.ep or (args.dp or 1) * (args.tp or 1) // (args.expert_tp or 1),
            expert_tp=args.expert_tp or 1,
        )
    if args.pp is not None or args.dp is not None:
        if not rules and args.tp:
            rules = preset(default_preset(args.source))
        return Mesh(dp=args.dp or 1, pp=args.pp or 1, tp=args.tp or 1, tp_rules=rules)
    if not rules and args.tp is None:
        return None
    if not rules:
        rules = preset(default_preset(args.source))
    return TensorParallel(rules, size=args.tp)


def default_preset(source: str) -> str:
    """The TP preset for ``--tp`` without rules: the checkpoint's ``config.json``
    ``model_type`` (an unknown family is an error, never silently another family's rules);
    a checkpoint without a config (synthetic ones) gets the llama preset, with a warning."""
    if source.startswith("model:"):  # shapes of a model family (distload.shapes)
        family = source.removeprefix("model:").split("-")[0]
        return {"qwen3": "qwen3_moe", "deepseek": "deepseek_v3"}.get(family, "llama")
    folder = Path(source)
    config = (folder if folder.is_dir() else folder.parent) / "config.json"
    if not config.is_file():
        log.warning("%s has no config.json: --tp uses the llama preset (pass --preset)", source)
        return "llama"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type in presets():
        return str(model_type)
    raise SystemExit(
        f"distload: {config} says model_type {model_type!r}, which has no TP preset "
        f"({', '.join(presets())}): pass --preset NAME or --rule PATTERN=SPEC"
    )


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: group)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (balanced by bytes)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (with --pp/--tp)")
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel groups for routed experts, over the mesh given by --dp/--pp/--tp "
        "(all of it: dp*pp*tp = world) or, without those, over the whole group (default with "
        "--expert-tp: the ranks of a stage / expert-tp)",
    )
    p.add_argument(
        "--expert-tp", type=int, default=None, help="ranks each routed expert is cut over (1)"
    )
    p.add_argument(
        "--device-map",
        type=device_map,
        default=None,
        help='auto | balanced | balanced_low_0 | sequential | JSON {module prefix: rank or "cpu"}',
    )
    p.add_argument(
        "--max-memory",
        type=max_memory,
        default=None,
        metavar="RANK=SIZE,...",
        help="limits for --device-map strategies, e.g. 0=10GiB,1=10GiB,cpu=40GiB",
    )
    p.add_argument(
        "--no-split",
        action="append",
        metavar="PREFIX",
        help="module prefix --device-map keeps whole (repeatable)",
    )
    p.add_argument("--preset", choices=presets(), help="TP rule preset (default with --tp: llama)")
    p.add_argument(
        "--rule",
        action="append",
        type=parse_rule,
        metavar="PATTERN=SPEC",
        help="TP rule over tensor names or module paths, e.g. '*.q_proj=colwise', "
        "'model.embed_tokens=embedding_rowwise', 'lm_head.weight=shard1' (repeatable)",
    )
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        help="cast floating tensors: bfloat16 (bf16), float16 (fp16, half), float32 (fp32)",
    )
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=None,
        help=f"bucket size in MiB (default {DEFAULT_BUCKET_BYTES // 2**20}, as distload.load)",
    )


def add_hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="Hub sources: branch, tag or commit")
    p.add_argument("--subfolder", default=None, help="folder of the source holding the weights")
    p.add_argument(
        "--variant", default=None, help="weights variant: model.VARIANT.safetensors (e.g. fp16)"
    )
    p.add_argument("--cache-dir", default=None, help="Hub cache (default: HF_HUB_CACHE)")
