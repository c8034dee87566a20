"""The safetensors dtype table and its mapping to torch dtypes (torch imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: safetensors dtype string -> item size in bytes
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}

FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def to_torch(name: str) -> torch.dtype:
    """safetensors dtype string -> torch dtype."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def from_torch(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype string (ValueError listing the valid choices)."""
    short = str(dtype).removeprefix("torch.")
    for key, value in _TORCH_NAMES.items():
        if value == short:
            return key
    raise ValueError(
        f"dtype {dtype} has no safetensors equivalent; valid: {sorted(_TORCH_NAMES.values())}"
    )


def parse_dtype(value: object) -> str | None:
    """User dtype argument (None, "auto", torch.dtype, "bfloat16", "BF16") -> safetensors name."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        if value in ITEMSIZE:
            return value
        for key, name in _TORCH_NAMES.items():
            if value.removeprefix("torch.") == name:
                return key
        raise ValueError(f"unknown dtype {value!r}; valid: 'auto', {sorted(_TORCH_NAMES.values())}")
    return from_torch(value)  # type: ignore[arg-type]
