"""One rank of a test group: set up the process group, run a scenario, write the outcome."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(os.environ["DISTLOAD_TEST_DIR"]) / f"result-{rank}.json"
    start = time.monotonic()
    if os.environ["DISTLOAD_TEST_BOOTSTRAP"] == "filestore" and world > 1:
        store = dist.FileStore(str(Path(os.environ["DISTLOAD_TEST_DIR"]) / "store"), world)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
    import importlib

    scenarios = importlib.import_module(os.environ["DISTLOAD_TEST_SCENARIOS"])

    try:
        result = getattr(scenarios, scenario)(args)
        data = {"ok": True, "result": result}
    except BaseException as exc:  # reported to the test, which decides
        data = {
            "ok": False,
            "error": {
                "type": type(exc).__name__,
                "message": str(exc),
                "phase": getattr(exc, "phase", None),
                "ranks": list(getattr(exc, "ranks", ()) or ()),
                "file": getattr(exc, "file", None),
                "tensor": getattr(exc, "tensor", None),
                "traceback": traceback.format_exc()[-3000:],
            },
        }
    data["seconds"] = time.monotonic() - start
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(out)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
