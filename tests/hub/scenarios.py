"""Per-rank bodies of the Hub tests (run by ``tests.distributed.worker`` in real processes).

The environment (``HF_ENDPOINT`` pointing at the test's fake Hub, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``) is set by the test before the process starts, as users would set it.
"""

from __future__ import annotations

import os
from typing import Any

import distload
from distload.verify import verify_against_safetensors


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def hub_load(args: dict[str, Any]) -> dict[str, Any]:
    """Load a Hub source; compare every piece with safetensors reads of the original files."""
    rank = _rank()
    if "nodes" in args:  # simulated nodes: ranks of one "node" share a node id (and a cache)
        os.environ["DISTLOAD_NODE_ID"] = f"node{args['nodes'][rank]}"
    cache = args["caches"][rank] if "caches" in args else None
    hook = args.get("hook")
    if hook and rank == hook["victim"]:
        _install_hook(hook)
    placement = distload.TensorParallel(distload.preset("llama")) if args.get("tp") else None
    state = distload.load(
        args["source"],
        placement,
        device="cpu",
        revision=args.get("revision"),
        subfolder=args.get("subfolder"),
        cache_dir=cache,
        hub_cache=args.get("hub_cache", "auto"),
        extra_files=args.get("extra_files", ()),
        timeout=args.get("timeout", 60.0),
    )
    bad = verify_against_safetensors(state.plan, state, rank, args["expect_root"])
    mine = state.report.ranks[rank]
    return {
        "bad": bad,
        "tensors": len(state),
        "commit": state.report.commit,
        "hub_cache": state.report.hub_cache,
        "downloaded": mine.bytes_downloaded,
        "read": mine.bytes_read,
        "total_read": state.report.bytes_read,
        "total_bytes": state.report.total_bytes,
        "files": {k: str(v) for k, v in state.files.items()},
        "root": str(state.root),
        "table": state.report.table(),
    }


def _install_hook(hook: dict[str, Any]) -> None:
    """Make this rank fail in the download phase: raise, die, or stall in its first fetch."""
    import signal
    import time

    from distload.hub import download

    original = download.fetch_verified

    def injected(*a: Any, **k: Any) -> Any:
        if hook["kind"] == "exception":
            raise RuntimeError("injected failure in phase download")
        if hook["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hook.get("stall", 0.0))
        return original(*a, **k)

    download.fetch_verified = injected
