"""Values derived from immutable objects, kept beside them for as long as each object lives.

The plan and the index are frozen dataclasses (plain data that travels as JSON); lookup tables
derived from them are built once per object and kept here, keyed by the object's identity and
dropped when it is collected -- never stored inside the frozen object.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Beside(Generic[K, V]):
    """``beside(obj)`` is ``make(obj)``, built on first use and kept while ``obj`` lives.

    Safe to call from several threads: the first builder wins, later calls get its value.
    ``make`` must not keep a reference to ``obj`` (that would keep it alive for ever).
    """

    def __init__(self, make: Callable[[K], V]) -> None:
        self._make = make
        self._values: dict[int, V] = {}
        self._lock = threading.Lock()

    def __call__(self, obj: K) -> V:
        key = id(obj)
        got = self._values.get(key)
        if got is None:
            made = self._make(obj)
            with self._lock:
                got = self._values.get(key)
                if got is None:
                    got = self._values[key] = made
                    weakref.finalize(obj, self._values.pop, key, None)
        return got

    def __len__(self) -> int:
        return len(self._values)
