"""The examples in distq's docstrings run as written (`make test` runs them here)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import distq
import distq.comm
import distq.theory

OPTIONAL = ("deepspeed", "horovod", "lightning", "accelerate", "transformers")  # engine adapters


def modules_with_examples() -> list[str]:
    """Modules of distq, distq.comm and distq.theory whose docstrings hold examples (the
    engine adapters, which import optional packages, excluded)."""
    names = ["distq", "distq.comm", "distq.theory"]
    for package in (distq, distq.comm, distq.theory):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    finder = doctest.DocTestFinder()
    return sorted(
        {
            name
            for name in names
            if not name.endswith(OPTIONAL)
            and any(t.examples for t in finder.find(importlib.import_module(name)))
        }
    )


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_quantizer_example_is_collected():
    assert "distq.quant" in modules_with_examples()
