"""Key transforms: rename, split fused tensors, merge or stack separate ones, transpose -- as data.

The coordinator applies transforms to the checkpoint's metadata before planning; no tensor
data is touched. The result is a list of :class:`View` s (the tensors the caller receives),
each made of :class:`Link` s: "this box of that stored tensor fills this box of the view,
possibly transposed". The planner then reads every stored byte once and gives each rank the
regions of views it holds, so a fused ``qkv`` split into ``q``/``k``/``v`` and sharded
colwise is read once and each rank receives only its rows of each part.

Transforms compose in order, e.g. ``[Rename(r"^transformer\\.h\\.(\\d+)\\.", r"model.layers.\\1."),
Transpose(".attn.c_attn.weight"), Split(".attn.c_attn.weight", [".q.weight", ".k.weight",
".v.weight"], dim=0)]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from distload.errors import PlacementError
from distload.transforms.views import Link, Suffix, Transform, View, clip, shift


def _combine(
    transform: Transform,
    views: list[View],
    member: Callable[[View], tuple[str, int] | None],
    build: Callable[[str, dict[int, View]], View],
) -> list[View]:
    """Replace the views ``member`` assigns to a group (group name, number in it) by one view
    per group, ``build(name, {number: view})``, placed where the group's first member was;
    other views keep their places. Two views with one number in a group are an error."""
    groups: dict[str, dict[int, View]] = {}
    first_pos: dict[str, int] = {}
    out: list[tuple[int, View]] = []
    for pos, v in enumerate(views):
        found = member(v)
        if found is None:
            out.append((pos, v))
            continue
        name, number = found
        members = groups.setdefault(name, {})
        if number in members:
            raise PlacementError(
                f"{transform!r}: {members[number].name!r} and {v.name!r} are both number "
                f"{number} of {name!r}",
                tensor=v.name,
            )
        members[number] = v
        first_pos.setdefault(name, pos)
    out.extend((first_pos[name], build(name, found)) for name, found in groups.items())
    return [v for _, v in sorted(out, key=lambda pv: pv[0])]


class Rename:
    """Rename tensors with a regular expression (``re.sub``; groups capture layer numbers).

    Example: ``Rename(r"^transformer\\.h\\.(\\d+)\\.", r"model.layers.\\1.")``.
    """

    def __init__(self, pattern: str, replacement: str) -> None:
        self.pattern = re.compile(pattern)
        self.replacement = replacement

    def apply(self, views: list[View]) -> list[View]:
        return [replace(v, name=self.pattern.sub(self.replacement, v.name)) for v in views]

    def __repr__(self) -> str:
        return f"Rename({self.pattern.pattern!r}, {self.replacement!r})"


class Transpose:
    """Transpose 2-d tensors whose names end with ``suffix`` (e.g. GPT-2 Conv1D weights)."""

    def __init__(self, suffix: str) -> None:
        self.match = Suffix(suffix)
        self.suffix = suffix

    def apply(self, views: list[View]) -> list[View]:
        out = []
        for v in views:
            if self.match.match(v.name) is None:
                out.append(v)
                continue
            if len(v.shape) != 2:
                raise PlacementError(
                    f"Transpose({self.suffix!r}): {v.name!r} has shape {list(v.shape)}, "
                    "only 2-d tensors can be transposed",
                    tensor=v.name,
                )
            links = tuple(
                replace(
                    link,
                    view_box=(link.view_box[1], link.view_box[0]),
                    transposed=not link.transposed,
                )
                for link in v.links
            )
            out.append(replace(v, shape=(v.shape[1], v.shape[0]), links=links))
        return out

    def __repr__(self) -> str:
        return f"Transpose({self.suffix!r})"


class Split:
    """Split tensors ending with ``suffix`` along ``dim`` into parts named by ``into``.

    Args:
        suffix: e.g. ``".qkv_proj.weight"``; the matched prefix is kept.
        into: suffixes of the parts, e.g. ``[".q_proj.weight", ".k_proj.weight", ...]``.
        dim: dimension to split.
        sizes: size of each part along ``dim`` (default: equal parts), e.g. for grouped-query
            attention ``[q_rows, kv_rows, kv_rows]``.
    """

    def __init__(
        self, suffix: str, into: Sequence[str], *, dim: int = 0, sizes: Sequence[int] | None = None
    ) -> None:
        if sizes is not None and len(sizes) != len(into):
            raise PlacementError(f"Split({suffix!r}): {len(sizes)} sizes for {len(into)} parts")
        self.match = Suffix(suffix)
        self.suffix, self.into, self.dim = suffix, list(into), dim
        self.sizes = list(sizes) if sizes is not None else None

    def apply(self, views: list[View]) -> list[View]:
        out = []
        for v in views:
            prefix = self.match.match(v.name)
            if prefix is None:
                out.append(v)
                continue
            if not -len(v.shape) <= self.dim < len(v.shape):
                raise PlacementError(
                    f"{self!r}: {v.name!r} has shape {list(v.shape)}, no dim {self.dim}",
                    tensor=v.name,
                )
            dim = self.dim % len(v.shape)
            total = v.shape[dim]
            sizes = self.sizes
            if sizes is None:
                if total % len(self.into):
                    raise PlacementError(
                        f"{self!r}: dim {dim} of {v.name!r} has size {total}, not divisible "
                        f"into {len(self.into)} equal parts; give sizes=",
                        tensor=v.name,
                    )
                sizes = [total // len(self.into)] * len(self.into)
            if sum(sizes) != total:
                raise PlacementError(
                    f"{self!r}: sizes {sizes} add up to {sum(sizes)}, but dim {dim} of "
                    f"{v.name!r} has size {total}",
                    tensor=v.name,
                )
            start = 0
            for part, size in zip(self.into, sizes, strict=True):
                links = []
                for link in v.links:
                    clipped = clip(link, dim, start, start + size)
                    if clipped is not None:
                        links.append(shift(clipped, dim, -start))
                shape = list(v.shape)
                shape[dim] = size
                out.append(View(prefix + part, tuple(shape), v.dtype, tuple(links)))
                start += size
        return out

    def __repr__(self) -> str:
        return f"Split({self.suffix!r}, {self.into!r}, dim={self.dim})"


class Merge:
    """Concatenate tensors ending with each of ``parts`` into one ending with ``into``.

    Example: ``Merge([".q_proj.weight", ".k_proj.weight", ".v_proj.weight"],
    ".qkv_proj.weight", dim=0)``. Every prefix must have all parts, with equal dtypes and
    equal sizes outside ``dim``.
    """

    def __init__(self, parts: Sequence[str], into: str, *, dim: int = 0) -> None:
        self.parts, self.into, self.dim = list(parts), into, dim
        self.matchers = [Suffix(p) for p in parts]

    def apply(self, views: list[View]) -> list[View]:
        return _combine(self, views, self._member, self._complete)

    def _member(self, v: View) -> tuple[str, int] | None:
        """(prefix, part number) of a view ending with one of the parts."""
        for i, m in enumerate(self.matchers):
            prefix = m.match(v.name)
            if prefix is not None:
                return prefix, i
        return None

    def _complete(self, prefix: str, found: dict[int, View]) -> View:
        if len(found) != len(self.parts):
            lacking = [self.parts[i] for i in range(len(self.parts)) if i not in found]
            raise PlacementError(
                f"{self!r}: {prefix!r} lacks {lacking}", tensor=prefix + lacking[0]
            )
        return self._merge(prefix, [found[i] for i in range(len(self.parts))])

    def _merge(self, prefix: str, members: list[View]) -> View:
        first = members[0]
        dim = self.dim % max(1, len(first.shape))
        for m in members:
            other = [s for d, s in enumerate(m.shape) if d != dim]
            base = [s for d, s in enumerate(first.shape) if d != dim]
            if m.dtype != first.dtype or len(m.shape) != len(first.shape) or other != base:
                raise PlacementError(
                    f"{self!r}: cannot concatenate {m.name!r} ({m.dtype} {list(m.shape)}) "
                    f"with {first.name!r} ({first.dtype} {list(first.shape)}) along dim {dim}",
                    tensor=m.name,
                )
        links: list[Link] = []
        offset = 0
        for m in members:
            links.extend(shift(link, dim, offset) for link in m.links)
            offset += m.shape[dim]
        shape = list(first.shape)
        shape[dim] = offset
        return View(prefix + self.into, tuple(shape), first.dtype, tuple(links))

    def __repr__(self) -> str:
        return f"Merge({self.parts!r}, {self.into!r}, dim={self.dim})"


class Stack:
    """Stack numbered tensors into one with a new leading dim indexed by their number.

    Names matching ``pattern`` (searched; group 1 captures the number) with the matched text
    replaced by ``into`` (an ``re.sub`` template) name the stacked tensor; its tensors must
    be numbered ``0..n-1``, all with one dtype and shape, and it gets shape ``(n, *shape)``.
    This is how per-expert weights of a mixture-of-experts checkpoint become the
    ``(experts, out, in)`` parameters of fused expert modules (transformers' MoE models):
    ``Stack(r"\\.experts\\.(\\d+)\\.down_proj\\.weight$", ".experts.down_proj")``. Only
    metadata changes: each rank still reads its experts' bytes once, where they are stored.
    """

    def __init__(self, pattern: str, into: str) -> None:
        self.pattern = re.compile(pattern)
        if self.pattern.groups < 1:
            raise PlacementError(
                f"Stack({pattern!r}): the pattern needs a group capturing the index"
            )
        self.into = into

    def apply(self, views: list[View]) -> list[View]:
        return _combine(self, views, self._member, self._stack)

    def _member(self, v: View) -> tuple[str, int] | None:
        """(stacked name, number) of a view matching the pattern."""
        match = self.pattern.search(v.name)
        if match is None:
            return None
        name = v.name[: match.start()] + match.expand(self.into) + v.name[match.end() :]
        return name, int(match.group(1))

    def _stack(self, name: str, found: dict[int, View]) -> View:
        count = max(found) + 1
        missing = [i for i in range(count) if i not in found]
        if missing:
            raise PlacementError(
                f"{self!r}: {name!r} has numbers up to {count - 1} but lacks {missing[:8]}",
                tensor=found[max(found)].name,
            )
        first = found[0]
        links: list[Link] = []
        for i in range(count):
            v = found[i]
            if v.dtype != first.dtype or v.shape != first.shape:
                raise PlacementError(
                    f"{self!r}: cannot stack {v.name!r} ({v.dtype} {list(v.shape)}) with "
                    f"{first.name!r} ({first.dtype} {list(first.shape)}) into {name!r}",
                    tensor=v.name,
                )
            links.extend(replace(ln, view_box=((i, i + 1), *ln.view_box)) for ln in v.links)
        return View(name, (count, *first.shape), first.dtype, tuple(links))

    def __repr__(self) -> str:
        return f"Stack({self.pattern.pattern!r}, {self.into!r})"
