"""pytest configuration: the test helpers live in tests/helpers.py (imported as a module).

Every test that starts processes (a `vitscale` job, torchrun, a launcher), directly or through a
fixture, is marked ``slow``, so ``pytest -m "not slow"`` is the fast inner loop.
"""

from __future__ import annotations

import inspect

import pytest

_LAUNCHES = ('vitscale("pretrain"', 'vitscale("finetune"', 'vitscale("evaluate"', 'vitscale("bench"', "torchrun(",
             "start(", "Popen(", "--nproc-per-node", "pretrain_args(", "_run(", "launch_main(")


def _launches(fn) -> bool:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return any(s in source for s in _LAUNCHES)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_launches(fn) for fn in [getattr(item, "function", None), *fixtures] if fn is not None):
            item.add_marker(pytest.mark.slow)
