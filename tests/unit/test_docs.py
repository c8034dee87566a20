"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import distload

EXAMPLES = [
    distload.TensorParallel,
    distload.PipelineParallel,
    distload.DeviceMap,
    distload.Mesh,
]


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: o.__name__)
def test_docstring_examples_run(obj: object) -> None:
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0, f"{obj} has no example"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {obj} failed"
