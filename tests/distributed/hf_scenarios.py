"""Scenarios with real transformers models (run inside each rank; see test_transformers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distload
from tests.distributed.scenarios import read_figures
from tests.reference import read_all, same_bits


def _build(kind: str, cfg: dict[str, Any], meta: bool = True) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, **cfg)
    config._attn_implementation = "eager"
    if meta:
        with init_empty_weights():  # parameters on meta, buffers (rotary) real
            return AutoModelForCausalLM.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def _reference_logits(args: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        args["source"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return ref(ids).logits


def _logits_error(model: Any, args: dict[str, Any]) -> float:
    """Relative difference of ``model``'s logits from from_pretrained's (raises above 1e-5)."""
    ids = _ids(args["config"]["vocab_size"])
    with torch.no_grad():
        logits = model(ids).logits
    want = _reference_logits(args, ids)
    err = float((logits - want).abs().max() / want.abs().max())
    if err > 1e-5:
        raise AssertionError(f"logits differ from from_pretrained by {err} (relative)")
    return err


def _ids(vocab: int) -> torch.Tensor:
    return (torch.arange(2 * 16).reshape(2, 16) * 7 + 3) % vocab


def hf_tensor_parallel(args: dict[str, Any]) -> dict[str, Any]:
    """Meta model -> torch parallelize_module (CPU mesh) -> load_into -> logits parity."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = dist.get_world_size()
    model = _build(args["kind"], args["config"])
    plan: dict[str, Any] = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(args["config"]["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[f"{p}.{name}"] = ColwiseParallel()
        plan[f"{p}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"{p}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
    result = distload.load_into(model, args["source"], device="cpu")
    ref = read_all(args["source"])
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.data
        if not same_bits(full, ref[name]):
            raise AssertionError(f"{name} differs after load_into")
    err = _logits_error(model, args)
    return {
        "err": err,
        **read_figures(result.report),
    }


def hf_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    """Two pipeline stages of GPT-2 (tied head): each rank materialises only its stage; the
    stage-by-stage forward equals from_pretrained's logits exactly."""
    rank = dist.get_rank()
    model = _build(args["kind"], args["config"])
    result = distload.load_into(
        model, args["source"], distload.PipelineParallel(num_stages=2), device="cpu"
    )
    ref = read_all(args["source"])
    real = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}
    for name in real:
        key = "transformer.wte.weight" if name == "lm_head.weight" else name
        if not same_bits(model.get_parameter(name).data, ref[key]):
            raise AssertionError(f"{name} differs")
    tr = model.transformer
    layers = len(tr.h)
    ids = _ids(args["config"]["vocab_size"])
    steps = ids.shape[1]
    # the additive causal mask GPT2Model builds for eager attention
    mask = torch.full((steps, steps), torch.finfo(torch.float32).min).triu(1)[None, None]

    def run(block: Any, h: torch.Tensor) -> torch.Tensor:
        out = block(h, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        if rank == 0:
            if tr.h[layers - 1].attn.c_attn.weight.is_meta is False:
                raise AssertionError("stage 0 holds the last layer")
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            h = tr.wte(ids) + tr.wpe(pos)
            for block in tr.h:
                if block.attn.c_attn.weight.is_meta:
                    break
                h = run(block, h)
            dist.send(h.contiguous(), 1)
            return {"stage": 0, "params": len(real), "read": result.report.bytes_read}
        h = torch.empty(ids.shape[0], ids.shape[1], args["config"]["n_embd"])
        dist.recv(h, 0)
        for block in tr.h:
            if block.attn.c_attn.weight.is_meta:
                continue
            h = run(block, h)
        logits = model.lm_head(tr.ln_f(h))
    if model.lm_head.weight is not tr.wte.weight:
        raise AssertionError("tied weights came apart")
    want = _reference_logits(args, ids)
    if not torch.equal(logits, want):
        err = float((logits - want).abs().max())
        raise AssertionError(f"pipeline logits differ by {err}")
    return {"stage": 1, "params": len(real), "read": result.report.bytes_read}


def hf_device_map(args: dict[str, Any]) -> dict[str, Any]:
    """load_into with a balanced device map: every materialised parameter bit for bit."""
    model = _build(args["kind"], args["config"])
    dm = distload.DeviceMap("balanced")
    result = distload.load_into(model, args["source"], dm, device="cpu")
    ref = read_all(args["source"])
    held = []
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        held.append(name)
        if not same_bits(param.data, ref[name]):
            raise AssertionError(f"{name} differs")
    return {
        "held": held,
        **read_figures(result.report),
    }


def hf_gpt2_tp(args: dict[str, Any]) -> dict[str, Any]:
    """GPT-2 checkpoint under TP with its preset: Conv1D weights transposed, c_attn split into
    q/k/v and sharded by rows; compared with plain torch ops on single-process reads."""
    from distload.verify import verify_against_safetensors
    from tests.reference import chunk

    rank, world = dist.get_rank(), dist.get_world_size()
    state = distload.load(
        args["source"],
        distload.TensorParallel(distload.preset("gpt2")),
        transforms=distload.preset_transforms("gpt2"),
        device="cpu",
    )
    ref = read_all(args["source"])
    for i in range(args["config"]["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = ref[f"{p}.attn.c_attn.weight"].t().chunk(3, dim=0)
        for name, full in (("q", q), ("k", k), ("v", v)):
            if not same_bits(state[f"{p}.attn.{name}.weight"], chunk(full, 0, world, rank)):
                raise AssertionError(f"{p}.attn.{name}.weight differs")
        proj = ref[f"{p}.attn.c_proj.weight"].t()
        if not same_bits(state[f"{p}.attn.c_proj.weight"], chunk(proj, 1, world, rank)):
            raise AssertionError(f"{p}.attn.c_proj.weight differs")
        fc = ref[f"{p}.mlp.c_fc.weight"].t()
        if not same_bits(state[f"{p}.mlp.c_fc.weight"], chunk(fc, 0, world, rank)):
            raise AssertionError(f"{p}.mlp.c_fc.weight differs")
    if not same_bits(
        state["transformer.wte.weight"], chunk(ref["transformer.wte.weight"], 0, world, rank)
    ):
        raise AssertionError("wte differs")
    bad = verify_against_safetensors(state.plan, state, rank)
    if bad:
        raise AssertionError(f"verify disagrees: {bad[:3]}")
    rep = state.report
    return {
        **read_figures(rep),
        "received": [r.bytes_received for r in rep.ranks],
    }


def hf_llama_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    """Two pipeline stages of a Llama-family model; stage-by-stage forward vs from_pretrained."""
    rank = dist.get_rank()
    model = _build(args["kind"], args["config"])
    result = distload.load_into(
        model, args["source"], distload.PipelineParallel(num_stages=2), device="cpu"
    )
    ref = read_all(args["source"])
    for name, param in model.named_parameters():
        if not param.is_meta and not same_bits(param.data, ref[name]):
            raise AssertionError(f"{name} differs")
    inner = model.model
    ids = _ids(args["config"]["vocab_size"])
    steps = ids.shape[1]
    mask = torch.full((steps, steps), torch.finfo(torch.float32).min).triu(1)[None, None]
    positions = torch.arange(steps).unsqueeze(0)
    hidden = args["config"]["hidden_size"]
    with torch.no_grad():
        if rank == 0:
            h = inner.embed_tokens(ids)
        else:
            h = torch.empty(ids.shape[0], steps, hidden)
            dist.recv(h, 0)
        rope = inner.rotary_emb(h, positions)
        for layer in inner.layers:
            if layer.self_attn.q_proj.weight.is_meta:
                continue
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        if rank == 0:
            dist.send(h.contiguous(), 1)
            return {"stage": 0, "read": result.report.bytes_read}
        logits = model.lm_head(inner.norm(h))
    want = _reference_logits(args, ids)
    err = float((logits - want).abs().max() / want.abs().max())
    if not torch.equal(logits, want):
        raise AssertionError(f"pipeline logits differ by {err} (relative)")
    return {"stage": 1, "err": err, "read": result.report.bytes_read}


def _fused_reference(ref: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The model's parameter names -> full values, built with torch ops from a single-process
    read of a checkpoint with one tensor per expert (what transformers' own loader does)."""
    if kind == "mixtral":
        moe, gate, up, down = "block_sparse_moe", "w1", "w3", "w2"
    else:
        moe, gate, up, down = "mlp", "gate_proj", "up_proj", "down_proj"
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(n.split(".")[2]) for n in ref if n.startswith("model.layers.")})
    for layer in layers:
        p = f"model.layers.{layer}.{moe}.experts"
        count = 1 + max(int(n.split(".")[5]) for n in ref if n.startswith(p + "."))
        q = f"model.layers.{layer}.mlp.experts"
        out[f"{q}.gate_up_proj"] = torch.stack(
            [
                torch.cat([ref[f"{p}.{e}.{gate}.weight"], ref[f"{p}.{e}.{up}.weight"]])
                for e in range(count)
            ]
        )
        out[f"{q}.down_proj"] = torch.stack([ref[f"{p}.{e}.{down}.weight"] for e in range(count)])
    for name, value in ref.items():
        if ".experts." not in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = value
    return out


def hf_fused_moe(args: dict[str, Any]) -> dict[str, Any]:
    """A transformers MoE model with fused expert parameters (``experts.gate_up_proj`` /
    ``down_proj``) loaded from its Hub-format checkpoint (one tensor per expert) through the
    preset's transforms. Every parameter equals, bit for bit, torch.stack / cat of
    single-process reads (under the preset's TP rules, this rank's chunk of it: a block of
    whole experts); replicated, the logits equal from_pretrained's."""
    from tests.reference import expected_local

    rank, world = dist.get_rank(), dist.get_world_size()
    name = args["preset"]
    model = _build(args["kind"], args["config"])
    placement = distload.TensorParallel(distload.preset(name)) if args["tp"] else None
    result = distload.load_into(
        model,
        args["source"],
        placement,
        transforms=distload.preset_transforms(name),
        device="cpu",
    )
    full = _fused_reference(read_all(args["source"]), args["kind"])
    rules = [[k, v] for k, v in distload.preset(name).items()] if args["tp"] else []
    for pname, param in model.named_parameters():
        want = expected_local(full[pname], pname, rules, world, rank, None)
        if not same_bits(param.data, want):
            raise AssertionError(f"{pname} differs after load_into")
    err = 0.0 if args["tp"] else _logits_error(model, args)
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    return {"err": err, "experts": experts, **read_figures(result.report)}


def hf_fused_moe_dtensor(args: dict[str, Any]) -> dict[str, Any]:
    """Expert parallelism as a training script sets it up: the fused expert parameters of a
    meta transformers MoE model made DTensors sharded on their expert dim over the world
    mesh, then load_into with no placement (read from the model) and the fused transforms.
    Each rank's local shard is its block of whole experts and the parameters stay DTensors;
    everything else is replicated; bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _build(args["kind"], args["config"])
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            for pname in ("gate_up_proj", "down_proj"):
                meta = getattr(module, pname)
                sharded = distribute_tensor(meta, mesh, [Shard(0)])
                setattr(module, pname, torch.nn.Parameter(sharded, requires_grad=False))
    result = distload.load_into(
        model, args["source"], transforms=distload.fused_experts(), device="cpu"
    )
    full = _fused_reference(read_all(args["source"]), args["kind"])
    sharded_names = []
    for pname, param in model.named_parameters():
        if isinstance(param, DTensor):
            sharded_names.append(pname)
            local = param.to_local()
            want = full[pname].chunk(world, dim=0)[rank]
            if not same_bits(local, want) or not same_bits(param.full_tensor(), full[pname]):
                raise AssertionError(f"{pname}: local shard differs")
        elif not same_bits(param.data, full[pname]):
            raise AssertionError(f"{pname} differs")
    rep = result.report
    expert_bytes = sum(full[n].numel() * full[n].element_size() for n in sharded_names)
    return {
        "sharded": sharded_names,
        "expert_bytes": expert_bytes,
        "held": [r.bytes_held for r in rep.ranks],
        **read_figures(rep),
    }


def hf_from_pretrained(args: dict[str, Any]) -> dict[str, Any]:
    """``distload.from_pretrained`` in one call against transformers' own from_pretrained
    (single process, same dtype): the same outputs, each byte read once per job."""
    import transformers
    from torch.distributed.tensor import DTensor

    dtype = getattr(torch, args["dtype"])
    cls = getattr(transformers, args["class"])
    tp_plan = args.get("tp_plan")
    if isinstance(tp_plan, str) and tp_plan.startswith("preset:"):  # distload's own rules
        tp_plan = distload.TensorParallel(distload.preset(tp_plan.removeprefix("preset:")))
    model = distload.from_pretrained(args["source"], tp_plan=tp_plan, dtype=dtype, timeout=60)
    if type(model) is not cls or model.training:
        raise AssertionError(f"got {type(model).__name__} (training={model.training})")
    ref = cls.from_pretrained(args["source"], dtype=dtype, attn_implementation="eager").eval()
    model.config._attn_implementation = "eager"
    ids = _ids(args["vocab"])
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    key = "logits" if hasattr(want, "logits") else "last_hidden_state"
    got_t, want_t = getattr(got, key), getattr(want, key)
    if isinstance(got_t, DTensor):
        got_t = got_t.full_tensor()
    err = float((got_t.float() - want_t.float()).abs().max() / want_t.float().abs().max())
    tied = getattr(model, "lm_head", None) is not None and (
        model.lm_head.weight is model.get_input_embeddings().weight
    )
    dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
    return {"err": err, "tied": tied, "dtensors": dtensors, **read_figures(model.distload_report)}


def hf_from_pretrained_error(args: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` expected to refuse: the error's type and message."""
    try:
        distload.from_pretrained(args["source"], tp_plan=args.get("tp_plan"), timeout=60)
    except distload.DistLoadError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    raise AssertionError("from_pretrained did not refuse")


def hf_from_pretrained_device_map(args: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained(device_map=...)``: each rank holds exactly the modules the map gives it
    (bit for bit as stored, tied heads included), and ``hf_device_map`` says which."""
    from safetensors import safe_open

    model = distload.from_pretrained(
        args["source"], device_map=args["device_map"], max_memory=args.get("max_memory"), timeout=60
    )
    rank = dist.get_rank()
    mapping = model.hf_device_map
    stored: dict[str, torch.Tensor] = {}
    for path in sorted(Path(args["source"]).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    held, wrong = [], []
    for name, param in model.state_dict(keep_vars=True).items():
        owner = max(
            (p for p in mapping if p == "" or name == p or name.startswith(p + ".")), key=len
        )
        target = mapping[owner]
        mine = target == rank or (target == "cpu" and rank == 0)
        tied = param is model.get_input_embeddings().weight
        if param.is_meta:
            if mine:
                wrong.append(f"{name}: meta on its rank {rank}")
            continue
        held.append(name)
        key = name if name in stored else "model.embed_tokens.weight" if tied else name
        if key in stored and not same_bits(param.data, stored[key]):
            wrong.append(f"{name}: differs from the stored tensor")
    if wrong:
        raise AssertionError(wrong)
    return {
        "map": {k: v for k, v in mapping.items()},
        "held": held,
        **read_figures(model.distload_report),
    }
