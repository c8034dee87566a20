"""Find a local checkpoint's files: a folder with an index or one file, or one file.

Runs on the coordinator (``distload.checkpoint.read_checkpoint`` calls it). Hub repositories
are told apart earlier, in ``distload.source``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from distload.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Source:
    """A resolved local checkpoint: its root folder and either an index or one file."""

    root: Path
    index_file: Path | None  # model.safetensors.index.json, if the checkpoint is sharded
    single_file: str | None  # file name (relative to root) of a one-file checkpoint


def variant_names(variant: str | None) -> tuple[str, str]:
    """(index name, single-file name) of a weights variant, named as transformers saves them:
    ``model.safetensors.index.fp16.json`` and ``model.fp16.safetensors`` for ``"fp16"``."""
    if not variant:
        return INDEX_NAME, SINGLE_NAME
    if "/" in variant or variant.startswith("."):
        raise CheckpointError(f"variant {variant!r} must be a plain name such as 'fp16'")
    return f"model.safetensors.index.{variant}.json", f"model.{variant}.safetensors"


def _variants(names: list[str]) -> list[str]:
    """Variants present among file names (``model.fp16.safetensors`` -> ``fp16``)."""
    found = set()
    for name in names:
        for pattern in (r"model\.safetensors\.index\.(.+)\.json", r"model\.([^.-]+)\.safetensors"):
            hit = re.fullmatch(pattern, name)
            if hit:
                found.add(hit.group(1))
    return sorted(found)


def choose_files(
    names: list[str], variant: str | None, where: str
) -> tuple[str | None, str | None] | None:
    """(index name, single-file name) among a folder's file ``names``: the variant's files
    when ``variant`` is given (an error naming the variants there when it is missing), else
    ``model.safetensors.index.json``, ``model.safetensors``, or the only index or only
    ``.safetensors`` file. None: nothing safetensors here."""
    index_name, single_name = variant_names(variant)
    if index_name in names:
        return index_name, None
    if single_name in names:
        return None, single_name
    present = _variants(names)
    if variant:
        raise CheckpointError(
            f"{where} has no weights of variant {variant!r} ({index_name} or {single_name}); "
            f"variants there: {present or 'none'}",
            file=where,
        )
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    shards = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return indexes[0], None
    if len(shards) == 1 and not indexes:
        return None, shards[0]
    if present:
        raise CheckpointError(
            f"{where} has no {INDEX_NAME} and no {SINGLE_NAME} but weight variants {present}: "
            "pass variant= to choose one",
            file=where,
        )
    return None


def resolve_source(
    source: str | os.PathLike[str], *, allow_pickle: bool = False, variant: str | None = None
) -> Source:
    """Resolve a user ``source`` argument to a local checkpoint.

    Accepts a folder with ``model.safetensors.index.json``, a folder with ``model.safetensors``
    (or exactly one ``*.safetensors`` file; ``variant="fp16"``: ``model.fp16.safetensors`` or
    its index), or the path of one ``.safetensors`` file. Hub repo
    ids are resolved to a local folder before this is called (see ``distload.hub``).
    """
    path = Path(source).expanduser()
    if not path.exists():
        hint = ""
        text = str(source)
        if text.count("/") == 1 and not text.startswith((".", "/")):
            hint = (
                " (it looks like a Hub repo id: distload.load and the CLI fetch Hub sources; "
                "this reads local files only)"
            )
        raise CheckpointError(f"checkpoint source {text!r} does not exist{hint}", file=text)
    path = path.resolve()
    if path.is_file():
        if path.suffix == ".json":
            return Source(path.parent, path, None)
        if allow_pickle and path.name.endswith(PICKLE_SUFFIXES):
            return Source(path.parent, None, path.name)
        refuse_pickle(path.name, path)
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file or an index .json", file=str(path)
            )
        return Source(path.parent, None, path.name)
    found = sorted(p.name for p in path.iterdir() if p.is_file())
    chosen = choose_files(found, variant, str(path))
    if chosen is not None:
        index_name, single = chosen
        return Source(path, path / index_name if index_name else None, single)
    if allow_pickle:
        if (path / "pytorch_model.bin.index.json").is_file():
            return Source(path, path / "pytorch_model.bin.index.json", None)
        pickles = [n for n in found if n.endswith(PICKLE_SUFFIXES)]
        if len(pickles) == 1:
            return Source(path, None, pickles[0])
    for name in found:
        refuse_pickle(name, path / name)
    raise CheckpointError(
        f"folder {path} has no {INDEX_NAME} and no single .safetensors file "
        f"(found: {found[:10]}{' ...' if len(found) > 10 else ''})",
        file=str(path),
    )


def refuse_pickle(name: str, path: Path) -> None:
    if name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path} is a pickle-based checkpoint; distload loads safetensors by default because "
            "unpickling can run arbitrary code. Convert it with safetensors.torch.save_file, or "
            "pass allow_pickle=True (--allow-pickle) to read it with the weights-only unpickler.",
            file=str(path),
        )


def safe_member(root: Path, name: object, *, where: str, contain: Path | None = None) -> Path:
    """Path of file ``name`` inside ``root``; refuses anything that could escape the folder.

    Symlinks must resolve inside ``contain`` (default ``root``); a Hub cache snapshot passes
    its repository folder, whose ``blobs/`` its links point into.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{where}: invalid file name {name!r}", file=str(name))
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(
            f"{where}: file name {name!r} escapes the checkpoint folder "
            "(absolute paths and '..' are refused)",
            file=name,
        )
    path = root / rel
    real_root = os.path.realpath(contain if contain is not None else root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(
            f"{where}: file {name!r} resolves to {real}, outside the checkpoint folder "
            f"{real_root} (symlink escape refused)",
            file=name,
        )
    if not path.exists():
        raise CheckpointError(f"{where}: file {name!r} is missing from {root}", file=name)
    if not path.is_file():
        raise CheckpointError(f"{where}: {name!r} is not a regular file", file=name)
    return path
