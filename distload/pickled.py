"""Opt-in reading of PyTorch zip checkpoints (``.bin``/``.pt``) without running their code.

Refused unless the caller passes ``allow_pickle=True``. Even then, nothing is ``torch.load``-ed:
only the archive's ``data.pkl`` is unpickled, with torch's weights-only unpickler (the one
``torch.load(weights_only=True)`` uses, which refuses anything but tensors and plain
containers), and its storages are materialised on the meta device. Each tensor then becomes a
byte range of its storage record inside the zip file -- exactly what a safetensors tensor is --
so reading, planning and transfers are the same as for safetensors. Runs on the coordinator.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distload.dtypes import ITEMSIZE, from_torch
from distload.errors import CheckpointError
from distload.index import FileMeta, TensorMeta

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _stored_sizes(path: Path, bad: Callable[[str], CheckpointError]) -> dict[str, int]:
    """Record name (without the archive's top folder) -> size, for uncompressed records only
    (a compressed record's bytes are not its data, so it cannot be read as a byte range)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {
                info.filename.split("/", 1)[1]: info.file_size
                for info in archive.infolist()
                if "/" in info.filename and info.compress_type == zipfile.ZIP_STORED
            }
    except (zipfile.BadZipFile, OSError) as exc:
        raise bad(f"unreadable zip directory ({exc})") from None


def read_pickle_header(path: Path, display: str) -> tuple[FileMeta, dict[str, TensorMeta]]:
    """Describe the tensors of a torch zip checkpoint as byte ranges (weights-only unpickling)."""
    import torch
    from torch._weights_only_unpickler import Unpickler

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{display}: {what}", file=display)

    try:
        reader = torch._C.PyTorchFileReader(str(path))
    except Exception:
        raise bad(
            "not a zip-format torch checkpoint (legacy torch.save format is not supported; "
            "re-save it, or convert it to safetensors)"
        ) from None
    records = set(reader.get_all_records())
    if "data.pkl" not in records:
        raise bad("archive has no data.pkl")
    if "byteorder" in records and bytes(reader.get_record("byteorder")).strip() != b"little":
        raise bad("big-endian checkpoints are not supported")
    keys: dict[int, str] = {}

    class MetaUnpickler(Unpickler):  # type: ignore[misc]
        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise bad(f"unexpected persistent id {pid!r}"[:200])
            _, storage_type, key, _location, numel = pid
            dtype = getattr(storage_type, "dtype", storage_type)
            if not isinstance(dtype, torch.dtype):
                raise bad(f"storage {key!r} has no dtype ({storage_type!r})")
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            untyped = torch.UntypedStorage(nbytes, device="meta")
            keys[untyped._cdata] = str(key)
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    try:
        raw = bytes(reader.get_record("data.pkl"))
        with warnings.catch_warnings():  # torch warns about pickle protocols it may refuse
            warnings.simplefilter("ignore", UserWarning)
            obj = MetaUnpickler(io.BytesIO(raw), encoding="utf-8").load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise bad(
            f"refused by the weights-only unpickler ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise bad("expected a flat state dict (name -> tensor)")
    size = path.stat().st_size
    stored = _stored_sizes(path, bad)
    tensors: dict[str, TensorMeta] = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise bad(f"entry {name!r} is a {type(t).__name__}, not a tensor")
        if not t.is_contiguous():
            raise bad(f"tensor {name!r} is not contiguous in its storage")
        key = keys.get(t.untyped_storage()._cdata)
        if key is None:
            raise bad(f"tensor {name!r} has no storage record")
        record = f"data/{key}"
        if record not in stored:
            raise bad(f"storage record {record!r} of tensor {name!r} is compressed or missing")
        start = reader.get_record_offset(record)  # type: ignore[attr-defined]  # (not in stubs)
        limit = start + stored[record]
        dtype = from_torch(t.dtype)
        offset = start + t.storage_offset() * ITEMSIZE[dtype]
        nbytes = t.numel() * ITEMSIZE[dtype]
        if not start <= offset <= offset + nbytes <= min(limit, size):
            raise CheckpointError(
                f"{display}: tensor {name!r} lies outside its storage record",
                file=display,
                tensor=name,
            )
        tensors[name] = TensorMeta(name, display, dtype, tuple(t.shape), offset, nbytes)
    return FileMeta(display, size, 0), tensors
