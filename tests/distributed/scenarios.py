"""Scenario functions run inside each rank of a test group (see launch.py / worker.py).

Each takes JSON args and returns JSON-able results; an exception is reported as the rank's
outcome. Verification happens inside the rank against single-process safetensors reads.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate

import distload
from distload import residency
from distload.execute.pagecache import page_cached
from distload.planner import traffic
from tests.distributed.cases import tp_rules
from tests.reference import expected_local, read_all, same_bits


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _world() -> int:
    return (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )


_rules = tp_rules


def read_figures(report: Any) -> dict[str, Any]:
    """Bytes each rank read and the loaded bytes, for the tests' read-once checks."""
    return {"read": [r.bytes_read for r in report.ranks], "total": report.total_bytes}


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def cached_buckets(state: Any) -> frozenset[int]:
    """The buckets every rank of a finished load read from the page cache itself."""
    if "page cache" not in state.report.exchange:
        return frozenset()
    return page_cached(state.plan, torch.device("cpu"), shm=len(set(state.plan.nodes)) == 1)


def planned_traffic(state: Any) -> list[Any]:
    """The plan's accounting of a finished load, under the exchange its report names."""
    multicast = state.report.exchange.startswith("multicast")
    return traffic(state.plan, multicast=multicast, page_cached=cached_buckets(state))


def evict(source: str) -> None:
    """Drop a checkpoint's files from the page cache (written back first, so the drop takes)."""
    root = Path(source)
    for path in [root] if root.is_file() else sorted(root.glob("*.safetensors")):
        residency.evict(path)


def load_and_verify(cfg: dict[str, Any]) -> dict[str, Any]:
    """One load per ``cfg``, every local piece compared bit for bit with safetensors."""
    rank, world = _rank(), _world()
    rules = cfg.get("rules", [])
    tp = cfg.get("tp") or world
    dtype = _dtype(cfg.get("dtype"))
    placement = distload.TensorParallel(_rules(rules), size=cfg.get("tp")) if rules else None
    out = None
    if cfg.get("out"):
        reference = read_all(cfg["source"])
        out = {}
        for name, full in reference.items():
            exp = expected_local(full, name, rules, tp, rank, dtype)
            out[name] = torch.full(exp.shape, 0, dtype=exp.dtype)
    if cfg.get("multicast") is False:
        os.environ["DISTLOAD_MULTICAST"] = "0"
    if cfg.get("page_cache") is not None:  # "0": shared buckets through slots; "force"
        os.environ["DISTLOAD_PAGE_CACHE"] = cfg["page_cache"]
    if cfg.get("nodes"):  # simulated nodes: the node index of every rank
        os.environ["DISTLOAD_NODE_ID"] = f"node{cfg['nodes'][rank]}"
    if cfg.get("cold"):  # the page cache drops the source's files first: O_DIRECT reads
        # once no rank holds a reference any more (their tensors may map the files' pages,
        # which the kernel then keeps): it is read again after the load
        reference = {}
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            evict(cfg["source"])
        if dist.is_initialized():
            dist.barrier()
    probe = residency.in_page_cache
    if cfg.get("resident") is not None:  # what each rank's page-cache probe answers
        answer = bool(cfg["resident"][rank])
        residency.in_page_cache = lambda *a, **k: answer  # type: ignore[assignment]
    try:
        state = distload.load(
            cfg["source"],
            placement,
            dtype=dtype,
            out=out,
            bucket_bytes=cfg.get("bucket_bytes"),
            device=cfg.get("device", "cpu"),
            timeout=cfg.get("timeout", 60),
            shm=cfg.get("shm"),
            direct_io=cfg.get("direct_io", True),
            readers=cfg.get("readers"),
        )
    finally:
        os.environ.pop("DISTLOAD_MULTICAST", None)
        os.environ.pop("DISTLOAD_PAGE_CACHE", None)
        os.environ.pop("DISTLOAD_NODE_ID", None)
        residency.in_page_cache = probe  # type: ignore[assignment]
    if out is None or cfg.get("cold"):
        reference = read_all(cfg["source"])
    if set(state) != set(reference):
        raise AssertionError(f"loaded names differ: {sorted(set(state) ^ set(reference))[:5]}")
    for name, full in reference.items():
        exp = expected_local(full, name, rules, tp, rank, dtype)
        got = state[name].cpu()
        if out is not None and state[name] is not out[name]:
            raise AssertionError(f"{name}: out= tensor was not returned")
        if not same_bits(got, exp):
            raise AssertionError(
                f"rank {rank}: tensor {name} differs: got {got.dtype} {tuple(got.shape)}, "
                f"expected {exp.dtype} {tuple(exp.shape)}"
            )
    rep = state.report
    # what the executor moved must be what the plan's accounting says it moves
    accounted = planned_traffic(state)
    return {
        "exchange": rep.exchange,
        "planned_sent": [t.sent for t in accounted],
        "planned_received": [t.received for t in accounted],
        "tensors": len(state),
        "total_bytes": rep.total_bytes,
        "bytes_read": [r.bytes_read for r in rep.ranks],
        "bytes_sent": [r.bytes_sent for r in rep.ranks],
        "bytes_received": [r.bytes_received for r in rep.ranks],
        "staging": [r.peak_staging_bytes for r in rep.ranks],
        "buckets": rep.buckets,
        "kernel_copied": [r.bytes_kernel_copied for r in rep.ranks],
        "direct": [r.bytes_direct for r in rep.ranks],
        "copied": [r.bytes_copied for r in rep.ranks],
        "held": [r.bytes_held for r in rep.ranks],
        "operations": [r.operations for r in rep.ranks],
        "cpu_seconds": [r.cpu_seconds for r in rep.ranks],
        # status checks the executor makes (collectives inside the execute phase)
        "status_checks": len(
            state.plan.status_checks(
                shm="shared memory" in rep.exchange, cached=cached_buckets(state)
            )
        ),
    }


def matrix(args: dict[str, Any]) -> list[dict[str, Any]]:
    """Several loads in one process group (also checks loads can follow each other)."""
    return [load_and_verify(cfg) for cfg in args["configs"]]


def expect_failure(args: dict[str, Any]) -> dict[str, Any]:
    """Run a load expected to fail; optionally sabotage one rank first. Reports the error."""
    rank = _rank()
    sabotage = args.get("sabotage")
    restore = None
    if sabotage and rank == sabotage["rank"]:
        restore = _install_sabotage(sabotage)
    start = time.monotonic()
    try:
        load_and_verify(args["cfg"])
    except distload.DistLoadError as exc:
        if restore is not None:
            restore()
        result = {
            "type": type(exc).__name__,
            "message": str(exc),
            "phase": exc.phase,
            "ranks": list(exc.ranks),
            "file": exc.file,
            "tensor": exc.tensor,
            "seconds": time.monotonic() - start,
        }
        if args.get("then_load"):
            # the process group must still work after a failed load
            result["after"] = load_and_verify(args["then_load"])
        return result
    raise AssertionError("the load did not fail")


def _install_sabotage(spec: dict[str, Any]) -> Any:
    """Make this rank fail in a chosen way (test-only monkeypatching of distload internals)."""
    from distload import execute, storage

    kind = spec["kind"]
    if kind == "read_error":
        original = storage.os.preadv
        calls = {"n": 0}

        def failing_preadv(fd: int, buffers: Any, offset: int) -> int:
            calls["n"] += 1
            if calls["n"] > spec.get("after", 0):
                raise OSError(5, "Input/output error (injected)")
            return original(fd, buffers, offset)

        storage.os.preadv = failing_preadv  # type: ignore[assignment]

        def restore() -> None:
            storage.os.preadv = original  # type: ignore[assignment]

        return restore
    if kind in ("kill", "stall", "raise"):
        original_step = execute.Executor._step
        count = {"n": 0}

        def step(self: execute.Executor, number: int, bucket: Any, prefetch: Any) -> None:
            count["n"] += 1
            if count["n"] == spec.get("at", 2):
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "stall":
                    time.sleep(spec["seconds"])
                else:
                    raise RuntimeError("injected failure in the transfer loop")
            original_step(self, number, bucket, prefetch)

        execute.Executor._step = step  # type: ignore[method-assign]

        def restore_step() -> None:
            execute.Executor._step = original_step  # type: ignore[method-assign]

        return restore_step
    raise ValueError(kind)


def stalled_load(args: dict[str, Any]) -> dict[str, Any]:
    """One rank stalls briefly (shorter than the timeout); the load must still succeed."""
    if _rank() == args["rank"]:
        _install_sabotage(
            {"kind": "stall", "rank": args["rank"], "at": 3, "seconds": args["seconds"]}
        )
    return load_and_verify(args["cfg"])


def _placement_from(spec: dict[str, Any]) -> Any:
    kind = spec["kind"]
    if kind == "pipeline":
        if "stages" in spec:
            return distload.PipelineParallel(spec["stages"])
        return distload.PipelineParallel(num_stages=spec["num_stages"])
    if kind == "device_map":
        return distload.DeviceMap(spec["map"])
    if kind == "mesh":
        return distload.Mesh(
            dp=spec["dp"],
            pp=spec["pp"],
            tp=spec["tp"],
            tp_rules=_rules(spec.get("rules", [])),
            stages=spec.get("stages"),
        )
    raise ValueError(kind)


def load_placement(args: dict[str, Any]) -> dict[str, Any]:
    """Load with a pipeline / device-map / mesh placement and check every local piece.

    ``expect`` (optional): name -> ranks that must hold it, computed by the test itself; the
    piece is the full tensor, TP-chunked by ``rules`` over ``tp`` (chunk = rank % tp).
    Without ``expect``, holders come from the plan and only bits and coverage are checked.
    """
    rank, world = _rank(), _world()
    spec = args["placement"]
    if args.get("page_cache") is not None:  # "0": shared buckets through slots always
        os.environ["DISTLOAD_PAGE_CACHE"] = args["page_cache"]
    try:
        state = distload.load(
            args["source"], _placement_from(spec), device="cpu", timeout=60, shm=args.get("shm")
        )
    finally:
        os.environ.pop("DISTLOAD_PAGE_CACHE", None)
    reference = read_all(args["source"])
    rules = spec.get("rules", [])
    tp = spec.get("tp", 1)
    expect = args.get("expect")
    if expect is not None:
        mine = {n for n, ranks in expect.items() if rank in ranks}
    else:
        mine = {
            m.name
            for t, m in enumerate(state.plan.tensors)
            if state.plan.local_shape(t, rank) is not None
        }
    if set(state) != mine:
        raise AssertionError(
            f"rank {rank}: holds {sorted(set(state) ^ mine)[:6]} wrongly (symmetric difference)"
        )
    for name in state:
        exp = expected_local(reference[name], name, rules, tp, rank, None)
        if not same_bits(state[name], exp):
            raise AssertionError(f"rank {rank}: {name} differs")
    held = sorted(state)
    gathered: list[Any] = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, held)  # test-side bookkeeping only
    else:
        gathered = [held]
    covered = {n for names in gathered for n in names}
    if rank == 0 and covered != set(reference):
        raise AssertionError(f"not covered by any rank: {sorted(set(reference) - covered)[:5]}")
    accounted = planned_traffic(state)
    plan = state.plan
    shared = [b for b in plan.buckets if b.kind != "local"]
    return {
        "shared_buckets": [r.shared_buckets for r in state.report.ranks],
        "plan_shared_buckets": len(shared),
        # over the transport a rank takes part only in the shared buckets it reads or receives
        "planned_shared_buckets": [
            sum(1 for b in shared if r in b.participants(world)) for r in range(world)
        ],
        "held": held,
        "exchange": state.report.exchange,
        "bytes_sent": [r.bytes_sent for r in state.report.ranks],
        "planned_sent": [t.sent for t in accounted],
        "bytes_read": [r.bytes_read for r in state.report.ranks],
        "total_bytes": state.report.total_bytes,
        "placement": state.report.placement,
    }


def parallel_model(args: dict[str, Any]) -> dict[str, Any]:
    """A meta model parallelised with torch's own TP APIs, then load_into; forward parity."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from distload.synthetic import LlamaShape
    from tests.models import TinyLlama
    from tests.reference import chunk

    shape = LlamaShape(**args["shape"])
    world, rank = _world(), _rank()
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = TinyLlama(shape)
    plan = {}
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        plan[f"{p}.self_attn.q_proj"] = ColwiseParallel()
        plan[f"{p}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"{p}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"{p}.mlp.up_proj"] = ColwiseParallel()
        plan[f"{p}.mlp.down_proj"] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    result = distload.load_into(model, args["source"], device="cpu", dtype=torch.float32)
    ref = read_all(args["source"])
    dtensors = 0
    for name, param in model.named_parameters():
        full = ref[name].float()
        if isinstance(param, DTensor):
            dtensors += 1
            dim = param.placements[0].dim if param.placements[0].is_shard() else None
            local = param.to_local()
            exp = full if dim is None else chunk(full, dim, world, rank)
            if not same_bits(local, exp):
                raise AssertionError(f"{name}: local shard differs")
            if not same_bits(param.full_tensor(), full):
                raise AssertionError(f"{name}: full tensor differs")
        elif not same_bits(param.data, full):
            raise AssertionError(f"{name}: replicated tensor differs")
    # forward parity with a single-process model loaded by safetensors + load_state_dict
    single = TinyLlama(shape)
    single.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.items()})
    ids = torch.arange(0, 24).reshape(2, 12) % shape.vocab
    with torch.no_grad():
        got = model(ids)
        want = single(ids)
    if isinstance(got, DTensor):
        got = got.full_tensor()
    # TP reduces in another order: compare relative to the logits' scale
    err = float((got - want).abs().max() / want.abs().max())
    if err > 1e-5:
        raise AssertionError(f"logits differ by {err} (relative)")
    return {
        "dtensors": dtensors,
        "max_err": err,
        **read_figures(result.report),
    }


def load_transformed(args: dict[str, Any]) -> dict[str, Any]:
    """GPT-2 style fused c_attn (Conv1D) -> transposed q/k/v Linear weights, sharded colwise;
    a GQA fused qkv split by sizes. Expected values built with plain torch ops."""
    from tests.reference import chunk

    rank, world = _rank(), _world()
    transforms = [
        distload.Transpose(".attn.c_attn.weight"),
        distload.Split(
            ".attn.c_attn.weight", [".attn.q.weight", ".attn.k.weight", ".attn.v.weight"], dim=0
        ),
        distload.Split(".attn.c_attn.bias", [".attn.q.bias", ".attn.k.bias", ".attn.v.bias"]),
        distload.Split(
            ".qkv.weight",
            [".q_proj.weight", ".k_proj.weight", ".v_proj.weight"],
            dim=0,
            sizes=args["gqa_sizes"],
        ),
        distload.Rename(r"^h\.(\d+)\.", r"model.layers.\1."),
    ]
    rules = {
        "*.attn.*.weight": "colwise",
        "*.attn.*.bias": "colwise",
        "*.q_proj.weight": "colwise",
        "*.k_proj.weight": "colwise",
        "*.v_proj.weight": "rowwise",
    }
    state = distload.load(
        args["source"],
        distload.TensorParallel(rules),
        device="cpu",
        transforms=transforms,
        bucket_bytes=args.get("bucket_bytes"),
    )
    ref = read_all(args["source"])
    expected: dict[str, torch.Tensor] = {}
    for name, full in ref.items():
        layer = name.split(".")[1]
        base = f"model.layers.{layer}"
        if name.endswith("c_attn.weight"):
            for part, t in zip("qkv", full.t().chunk(3, dim=0)):
                expected[f"{base}.attn.{part}.weight"] = chunk(t, 0, world, rank)
        elif name.endswith("c_attn.bias"):
            for part, t in zip("qkv", full.chunk(3, dim=0)):
                expected[f"{base}.attn.{part}.bias"] = chunk(t, 0, world, rank)
        elif name.endswith("qkv.weight"):
            q, k, v = full.split(args["gqa_sizes"], dim=0)
            expected[f"{base}.q_proj.weight"] = chunk(q, 0, world, rank)
            expected[f"{base}.k_proj.weight"] = chunk(k, 0, world, rank)
            expected[f"{base}.v_proj.weight"] = chunk(v, 1, world, rank)
        else:
            expected[name.replace(f"h.{layer}.", f"{base}.")] = full
    if set(state) != set(expected):
        raise AssertionError(f"names differ: {sorted(set(state) ^ set(expected))[:6]}")
    for name, exp in expected.items():
        if not same_bits(state[name], exp.contiguous()):
            raise AssertionError(f"rank {rank}: {name} differs")
    from distload.verify import verify_against_safetensors

    bad = verify_against_safetensors(state.plan, state, rank)
    if bad:
        raise AssertionError(f"verify disagrees on {bad[:3]}")
    rep = state.report
    return {
        **read_figures(rep),
    }


def dtensor_models(args: dict[str, Any]) -> dict[str, Any]:
    """as_dtensor=True on a plain meta model (it runs tensor parallel, the same logits as the
    model loaded whole), and placements inferred from fully_shard."""
    from torch.distributed.tensor import DTensor

    from distload.synthetic import LlamaShape
    from tests.models import TinyLlama
    from tests.reference import chunk

    shape = LlamaShape(**args["shape"])
    world, rank = _world(), _rank()
    ref = {k: v.float() for k, v in read_all(args["source"]).items()}  # cast exactly
    tp = args["tp"]
    with torch.device("meta"):
        model = TinyLlama(shape)
    rules = {
        "model.embed_tokens": "embedding_rowwise",
        "*.q_proj.weight": "colwise",
        "*.o_proj.weight": "rowwise",
        "*.gate_proj": "colwise",
        "*.up_proj": "colwise",
        "*.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }
    distload.load_into(
        model,
        args["source"],
        distload.TensorParallel(rules, size=tp),
        device="cpu",
        dtype=torch.float32,  # float32 logits: the TP reductions' order is all that differs
        as_dtensor=True,
    )
    checked = 0
    for name, param in model.named_parameters():
        sharded = name.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight"))
        sharded = sharded and ".k_proj" not in name and ".v_proj" not in name
        if isinstance(param, DTensor) != sharded:
            raise AssertionError(
                f"{name}: DTensor {isinstance(param, DTensor)}, expected {sharded}"
            )
        if not sharded:
            if not same_bits(param.data, ref[name]):
                raise AssertionError(f"{name} differs")
            continue
        local = param.to_local()
        shard = [p for p in param.placements if p.is_shard()]
        exp = chunk(ref[name], shard[0].dim, tp, rank % tp) if shard else ref[name]
        if not same_bits(local, exp) or not same_bits(param.full_tensor(), ref[name]):
            raise AssertionError(f"{name} differs")
        checked += 1
    whole = TinyLlama(shape)
    whole.load_state_dict(ref, strict=False)
    ids = (torch.arange(24).reshape(2, 12) * 5 + 1) % shape.vocab
    with torch.no_grad():
        got, want = model(ids), whole(ids)
    err = float((got - want).abs().max() / want.abs().max())
    if err > 1e-5:
        raise AssertionError(f"tensor-parallel logits differ by {err} (relative)")

    # FSDP2: parameters become Shard(0) DTensors over the data-parallel mesh
    ref = read_all(args["source"])
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        fsdp_model = TinyLlama(shape)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)
    result = distload.load_into(fsdp_model, args["source"], device="cpu")
    for name, param in fsdp_model.named_parameters():
        if not isinstance(param, DTensor):
            raise AssertionError(f"{name} is not sharded by fully_shard")
        if not same_bits(param.to_local(), chunk(ref[name], 0, world, rank)):
            raise AssertionError(f"fsdp {name} local shard differs")
        if not same_bits(param.full_tensor(), ref[name]):
            raise AssertionError(f"fsdp {name} differs")
    return {
        "checked": checked,
        **read_figures(result.report),
    }


def training_step(args: dict[str, Any]) -> dict[str, Any]:
    """Inside a training script: own process group (set up by the worker), two subgroups that
    each parallelise a meta model, load_into concurrently, then take a training step."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from distload.synthetic import LlamaShape
    from tests.models import TinyLlama

    rank = _rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # same order on every rank
    mine = groups[rank // 2]
    shape = LlamaShape(**args["shape"])
    with torch.device("meta"):
        model = TinyLlama(shape)
    mesh = DeviceMesh.from_group(mine, "cpu")
    plan: dict[str, Any] = {}
    for i in range(shape.layers):
        plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    result = distload.load_into(
        model, args["source"], device="cpu", dtype=torch.float32, group=mine
    )
    before = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
        for n, p in model.named_parameters()
    }
    ref = read_all(args["source"])
    for name, value in before.items():
        if not torch.equal(value, ref[name].float()):
            raise AssertionError(f"{name} differs before training")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.arange(16).reshape(2, 8) % shape.vocab
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, shape.vocab).float(), ids.roll(-1, dims=1).reshape(-1)
    )
    loss.backward()
    optimizer.step()
    changed = sum(
        not torch.equal(before[n], (p.full_tensor() if isinstance(p, DTensor) else p.detach()))
        for n, p in model.named_parameters()
    )
    trained = sum(p.grad is not None for p in model.parameters())
    return {
        "loss": float(loss),
        "changed": changed,
        "params": trained,
        "group_size": result.report.world_size,
        **read_figures(result.report),
    }


def verified_load(args: dict[str, Any]) -> dict[str, Any]:
    """A TP load checked against a manifest while reading."""
    state = distload.load(
        args["source"],
        distload.TensorParallel(distload.preset("llama")),
        device="cpu",
        verify=True,
        bucket_bytes=args.get("bucket_bytes"),
    )
    return {
        **read_figures(state.report),
    }


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def many_loads(args: dict[str, Any]) -> dict[str, Any]:
    """Many loads in one process group, cycling placements, sources and dtypes: memory, file
    descriptors and threads come back to baseline, and loads do not slow down."""
    import gc
    import threading

    configs = args["configs"]
    rss, fds, threads, seconds = [], [], [], []
    for i in range(args["rounds"]):
        cfg = configs[i % len(configs)]
        start = time.perf_counter()
        result = load_and_verify(cfg)
        seconds.append(time.perf_counter() - start)
        del result
        gc.collect()
        rss.append(_rss_anon())
        fds.append(len(os.listdir("/proc/self/fd")))
        threads.append(threading.active_count())
    return {"rss": rss, "fds": fds, "threads": threads, "seconds": seconds}


# (module, attribute) whose call marks the start of a phase on one rank, for the failure matrix
PHASE_HOOKS: dict[str, tuple[str, str]] = {
    "runtime": ("distload.runtime", "node_identity"),
    "index": ("distload.source", "from_coordinator"),  # non-coordinators wait for the index
    "index@0": ("distload.source.Coordinator", "read_index"),  # the coordinator's index work
    "plan": ("distload.plan.LoadPlan", "from_json"),
    "plan@0": ("distload.source", "make_plan"),
    "materialize": ("distload.api", "destinations"),
    "read": ("distload.storage.FileReader", "read"),
    "transfer": ("distload.transport.torch_dist.TorchDistTransport", "send"),
    "transfer@recv": ("distload.transport.torch_dist.TorchDistTransport", "recv"),
    "transfer@shm": ("distload.execute.exchange.ShmBuckets", "bucket"),
    "transfer@pagecache": ("distload.execute.pagecache.PageCacheBuckets", "bucket"),
    "close": ("distload.report.RankReport", "to_json"),
}


def _resolve(path: str) -> Any:
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def failure_case(args: dict[str, Any]) -> dict[str, Any]:
    """One cell of the failure matrix: inject ``kind`` into ``phase`` on rank ``victim``."""
    rank = _rank()
    phase, kind, victim, timeout = args["phase"], args["kind"], args["victim"], args["timeout"]
    if args.get("nodes"):  # simulated nodes: the node index of every rank
        os.environ["DISTLOAD_NODE_ID"] = f"node{args['nodes'][rank]}"
    if rank == victim:
        hook = phase
        if rank == 0 and f"{phase}@0" in PHASE_HOOKS:
            hook = f"{phase}@0"
        if phase == "transfer" and args.get("receiver"):
            hook = "transfer@recv"
        hook = args.get("hook") or hook
        owner_path, attr = PHASE_HOOKS[hook]
        owner = _resolve(owner_path)
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        fn = original.__func__ if isinstance(original, staticmethod) else original
        fired = {"done": False}

        def injected(*a: Any, **k: Any) -> Any:
            if not fired["done"]:
                fired["done"] = True
                if kind == "exception":
                    raise RuntimeError(f"injected failure in phase {phase}")
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind in ("stall_long", "stall_short"):
                    time.sleep(args["stall"])
            return fn(*a, **k)

        setattr(
            owner, attr, staticmethod(injected) if isinstance(original, staticmethod) else injected
        )
    start = time.monotonic()
    try:
        state = distload.load(
            args["source"],
            distload.TensorParallel(distload.preset("llama")),
            device="cpu",
            timeout=timeout,
            bucket_bytes=args.get("bucket_bytes"),
            shm=args.get("shm"),
        )
    except distload.DistLoadError as exc:
        return {
            "ok": False,
            "type": type(exc).__name__,
            "phase": exc.phase,
            "ranks": list(exc.ranks),
            "message": str(exc)[:2000],
            "seconds": time.monotonic() - start,
        }
    except Exception as exc:  # the victim's own injected exception may surface here
        return {
            "ok": False,
            "type": type(exc).__name__,
            "phase": None,
            "ranks": [],
            "message": str(exc)[:2000],
            "seconds": time.monotonic() - start,
        }
    return {"ok": True, "tensors": len(state), "seconds": time.monotonic() - start}


def load_experts(args: dict[str, Any]) -> dict[str, Any]:
    """Load a mixture-of-experts checkpoint with expert parallelism; every rank checks it holds
    exactly ``expect[rank]`` (name -> [dim, chunks, index] or None for the whole tensor), bit
    for bit against a single-process read."""
    from tests.reference import chunk

    rank = _rank()
    spec = args["placement"]
    if spec["kind"] == "mesh":
        placement: Any = distload.Mesh(
            dp=spec["dp"],
            pp=spec["pp"],
            tp=spec["tp"],
            ep=spec["ep"],
            expert_tp=spec["expert_tp"],
            tp_rules=distload.preset("qwen3_moe"),
        )
    else:
        placement = distload.ExpertParallel(
            tp_rules=distload.preset("qwen3_moe"), expert_tp=spec["expert_tp"]
        )
    state = distload.load(args["source"], placement, device="cpu", timeout=60, shm=args.get("shm"))
    reference = read_all(args["source"])
    expect = args["expect"][rank]
    if set(state) != set(expect):
        raise AssertionError(f"rank {rank}: holds {sorted(set(state) ^ set(expect))[:6]} wrongly")
    for name, where in expect.items():
        want = reference[name] if where is None else chunk(reference[name], *where)
        if not same_bits(state[name], want):
            raise AssertionError(f"rank {rank}: {name} differs")
    return {
        **read_figures(state.report),
        "held_bytes": [r.bytes_held for r in state.report.ranks],
        "placement": state.report.placement,
    }


def _raised(exc: distload.DistLoadError, start: float) -> dict[str, Any]:
    """What a rank reports of the error it raised."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "phase": exc.phase,
        "ranks": list(exc.ranks),
        "seconds": time.monotonic() - start,
    }


def disagreeing_load(args: dict[str, Any]) -> dict[str, Any]:
    """Every rank loads with ``cfg`` updated by its own ``per_rank`` overrides; reports the
    error each rank raised (the load must fail on every rank)."""
    rank = _rank()
    cfg = dict(args["cfg"], **args.get("per_rank", {}).get(str(rank), {}))
    start = time.monotonic()
    try:
        load_and_verify(cfg)
    except distload.DistLoadError as exc:
        return _raised(exc, start)
    raise AssertionError("the load did not fail")


def stage_out_load(args: dict[str, Any]) -> dict[str, Any]:
    """Pipeline stages: each rank passes ``out=`` for its own stage's tensors only; the load
    loads the union and every rank's pieces are bit exact."""
    rank, world = _rank(), _world()
    reference = read_all(args["source"])
    placement = distload.PipelineParallel(num_stages=world)
    from distload.planner import make_plan
    from distload.source import open_index

    index, _ = open_index(
        args["source"], distload.hub.options.HubOptions(), max_header_bytes=1 << 26
    )
    plan = make_plan(index, world, placement)
    mine = [o.name for t, o in enumerate(plan.outputs) if plan.local_shape(t, rank) is not None]
    out = {name: torch.empty_like(reference[name]) for name in mine}
    state = distload.load(args["source"], placement, out=out, device="cpu", timeout=60)
    assert set(state) == set(mine), sorted(set(state) ^ set(mine))[:5]
    for name in mine:
        assert state[name] is out[name] and same_bits(out[name], reference[name]), name
    return {"mine": len(mine), "planned": len(state.plan.outputs)}


def absent_rank_load(args: dict[str, Any]) -> dict[str, Any]:
    """Ranks in ``absent`` never call distload (they exit at once); the others load and
    report the error each raised."""
    rank = _rank()
    if rank in args["absent"]:
        return {"absent": True}
    start = time.monotonic()
    try:
        distload.load(args["source"], device="cpu", timeout=60)
    except distload.DistLoadError as exc:
        return _raised(exc, start)
    raise AssertionError("the load did not fail")


def sabotaged_load(args: dict[str, Any]) -> dict[str, Any]:
    """A load where rank 0 does something hostile: ``raising_progress`` (its progress
    callback raises at the third bucket) or ``rewrite_shard`` (right after planning, before
    any rank reads, a shard is rewritten with the same tensors and a longer header)."""
    rank = _rank()
    kind = args["kind"]
    progress = None
    if rank == 0 and kind == "raising_progress":

        def progress(done: int, total: int) -> None:
            if done > total // 3:
                raise ValueError(f"progress callback broke at {done} of {total} bytes")

    if rank == 0 and kind == "rewrite_shard":
        from safetensors.torch import load_file, save_file

        from distload import api

        original = api.agree_on_plan

        def rewriting(*a: Any, **k: Any) -> Any:
            plan = original(*a, **k)
            shard = Path(args["source"]) / args["shard"]
            save_file(load_file(shard), str(shard), metadata={"format": "pt", "pad": "x" * 64})
            return plan

        api.agree_on_plan = rewriting  # type: ignore[assignment]
    start = time.monotonic()
    try:
        distload.load(
            args["source"], device="cpu", timeout=30, bucket_bytes=20_000, progress=progress
        )
    except distload.DistLoadError as exc:
        return _raised(exc, start)
    raise AssertionError("the load did not fail")


def mesh_group_load(args: dict[str, Any]) -> dict[str, Any]:
    """``group=`` given as a DeviceMesh: a 1-d mesh stands for its group; a 2-d one is
    refused with a clear error."""
    from torch.distributed.device_mesh import init_device_mesh

    world = _world()
    mesh = init_device_mesh("cpu", (world,))
    state = distload.load(args["source"], group=mesh, device="cpu", timeout=60)
    reference = read_all(args["source"])
    assert all(same_bits(state[n], reference[n]) for n in reference)
    two = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    try:
        distload.load(args["source"], group=two, device="cpu", timeout=60)
    except distload.DistLoadError as exc:
        return {"refused": str(exc)}
    raise AssertionError("a 2-d mesh was accepted as group=")


def dtensor_out(args: dict[str, Any]) -> dict[str, Any]:
    """``load(out={name: DTensor})`` on a (dp, tp) mesh's tp dim: each DTensor's local shard
    filled in place, the DTensors handed back; a wrong global shape fails every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor import empty as dtensor_empty

    world = _world()
    ref = read_all(args["source"])
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    out = {}
    for name, full in ref.items():
        place = [Shard(0)] if full.dim() == 2 else [Replicate()]
        out[name] = dtensor_empty(full.shape, dtype=full.dtype, device_mesh=mesh, placements=place)
    state = distload.load(args["source"], out=out, device="cpu", timeout=60)
    for name, full in ref.items():
        got = state[name]
        if got is not out[name] or not isinstance(got, DTensor):
            raise AssertionError(f"{name}: not the caller's DTensor back")
        if not same_bits(got.full_tensor(), full):
            raise AssertionError(f"{name} differs")
    name = next(n for n, t in ref.items() if t.dim() == 2)
    wrong = dict(out)
    shape = (ref[name].shape[0] + 2, *ref[name].shape[1:])
    wrong[name] = dtensor_empty(
        shape, dtype=ref[name].dtype, device_mesh=mesh, placements=[Shard(0)]
    )
    try:
        distload.load(args["source"], out=wrong, device="cpu", timeout=60)
    except distload.DistLoadError as exc:
        return {"loaded": len(state), "error": str(exc), **read_figures(state.report)}
    raise AssertionError("a DTensor of the wrong global shape was accepted")


def transport_bytes(args: dict[str, Any]) -> dict[str, Any]:
    """``all_gather_bytes`` and ``broadcast_bytes`` of payloads around the inline size: each
    rank gets every rank's bytes exactly (one round or two)."""
    from distload.transport.torch_dist import INLINE_BYTES, TorchDistTransport

    rank, world = _rank(), _world()
    net = TorchDistTransport(None, torch.device("cpu"), timeout=30)
    sizes = [0, 1, INLINE_BYTES - 9, INLINE_BYTES - 8, INLINE_BYTES - 7, 3 * INLINE_BYTES]

    def payload(r: int, n: int) -> bytes:
        return bytes((r * 7 + i) % 251 for i in range(n))

    gathered_ok, broadcast_ok = [], []
    for n in sizes:
        for spread in (0, 1):  # every rank the same size, or rank r sends n * r // world
            size_of = [n * r // max(1, world - 1) if spread else n for r in range(world)]
            got = net.all_gather_bytes(payload(rank, size_of[rank]), "test")
            gathered_ok.append(got == [payload(r, size_of[r]) for r in range(world)])
        src = n % world
        got_b = net.broadcast_bytes(payload(src, n) if rank == src else None, src, "test")
        broadcast_ok.append(got_b == payload(src, n))
    return {"gathered": gathered_ok, "broadcast": broadcast_ok}
