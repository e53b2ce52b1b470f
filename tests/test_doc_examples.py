"""Every example in a docstring runs and prints what it says: a reader copies them."""

import doctest
import importlib
import pkgutil

import pytest

import ppcompile
import ppcompile.passes
import ppcompile.runtime


def _modules() -> list[str]:
    names = []
    for package in (ppcompile, ppcompile.passes, ppcompile.runtime):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if not module.ispkg and not module.name.endswith("__main__"):
                names.append(module.name)
    return sorted(names)


MODULES = _modules()


def test_the_examples_cover_the_three_packages():
    assert {"ppcompile.replay", "ppcompile.passes.partition_stages", "ppcompile.runtime.trace"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {name}'s {result.attempted} examples printed otherwise"
