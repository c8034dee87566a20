"""What a placement learns from a model's module tree (runs on every rank, from the same model).

``load_into`` hands a placement that has ``for_model`` the model it loads into; the placement
keeps only plain data from it (names and class names), so it still plans on rank 0 alone and
its fingerprint is comparable between ranks:

- *units*: the modules that move whole, in the model's order: a module whose class is in
  ``no_split`` (transformers' ``_no_split_modules``: decoder layers, ``BertEmbeddings``), a
  module named in ``no_split``, or a module holding no layer stack (``ModuleList``) below it
  (``lm_head``, ``model.norm``, ``pooler``); only modules holding a stack are split, into
  their children; each unit with every parameter and buffer name under it (buffer-only
  modules such as ``rotary_emb`` are units too);
- *ties*: groups of names that share one tensor (``lm_head.weight`` and
  ``model.embed_tokens.weight``), declared or already applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModuleTree:
    """A model's whole-module units and tie groups, as names."""

    units: tuple[tuple[str, tuple[str, ...]], ...]  # (module path, state names under it)
    ties: tuple[tuple[str, ...], ...]  # names sharing one tensor (groups of two or more)
    classes: tuple[str, ...]  # class names present in the model (for no_split checks)

    def unit_of(self) -> dict[str, str]:
        """State name -> the path of the unit that holds it."""
        return {name: prefix for prefix, names in self.units for name in names}

    def tie_of(self) -> dict[str, tuple[str, ...]]:
        """State name -> its tie group (names sharing its tensor), for tied names only."""
        return {name: group for group in self.ties for name in group}


def default_no_split(model: torch.nn.Module) -> list[str]:
    """The class names transformers keeps whole for this model (``_no_split_modules`` of the
    model and its sub-models: a ``BertForMaskedLM``'s own list is empty, its ``bert``'s not)."""
    found: dict[str, None] = {}
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            found.setdefault(str(name), None)
    return list(found)


def module_tree(model: torch.nn.Module, no_split: Sequence[str]) -> ModuleTree:
    """The :class:`ModuleTree` of ``model`` with ``no_split`` class names or module paths."""
    from distload.materialize.model import declared_ties, model_entries, tie_groups

    keep = set(no_split)
    units: list[tuple[str, tuple[str, ...]]] = []

    def state_names(prefix: str, module: torch.nn.Module, recurse: bool) -> tuple[str, ...]:
        lead = f"{prefix}." if prefix else ""
        params = module.named_parameters(prefix="", recurse=recurse, remove_duplicate=False)
        buffers = module.named_buffers(prefix="", recurse=recurse, remove_duplicate=False)
        return tuple(lead + n for n, _ in params) + tuple(lead + n for n, _ in buffers)

    def visit(prefix: str, module: torch.nn.Module) -> None:
        children = list(module.named_children())
        stack = any(
            isinstance(m, torch.nn.ModuleList | torch.nn.ModuleDict) for m in module.modules()
        )
        whole = type(module).__name__ in keep or prefix in keep or not stack
        if whole:
            names = state_names(prefix, module, recurse=True)
            if names:
                units.append((prefix, names))
            return
        own = state_names(prefix, module, recurse=False)
        if own:
            units.append((prefix, own))
        for child, sub in children:
            visit(f"{prefix}.{child}" if prefix else child, sub)

    visit("", model)
    entries = model_entries(model)
    groups = tie_groups(entries, declared_ties(model))
    classes = tuple(sorted({type(m).__name__ for m in model.modules()}))
    return ModuleTree(tuple(units), tuple(tuple(g) for g in groups if len(g) > 1), classes)
