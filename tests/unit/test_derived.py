"""Values derived beside immutable objects: built once, shared across threads, dropped with
their object."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

from distload.derived import Beside


@dataclass(frozen=True)
class Thing:
    n: int


def test_built_once_per_object_and_dropped_with_it() -> None:
    calls: list[int] = []
    beside: Beside[Thing, list[int]] = Beside(lambda t: calls.append(t.n) or [t.n])
    a, b = Thing(1), Thing(1)  # equal, but two objects: two tables
    assert beside(a) is beside(a) and beside(b) is not beside(a)
    assert calls == [1, 1] and len(beside) == 2
    del a
    gc.collect()
    assert len(beside) == 1


def test_threads_get_one_value() -> None:
    beside: Beside[Thing, object] = Beside(lambda t: object())
    thing = Thing(2)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(beside(thing))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(v) for v in got}) == 1
