"""pytest configuration: the test helpers live in tests/helpers.py (imported as a module).

Every test that starts processes (a `vitscale` job, torchrun, a launcher), directly or through a
fixture, is marked ``slow``, so ``pytest -m "not slow"`` is the fast inner loop. The longest files
are collected first (:data:`LONGEST_FIRST`), which keeps the parallel suite's tail short.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile

import pytest

from tests.helpers import SHARED_ENV

_LAUNCHES = ('vitscale("pretrain"', 'vitscale("finetune"', 'vitscale("evaluate"', 'vitscale("bench"', "torchrun(",
             "start(", "Popen(", "--nproc-per-node", "pretrain_args(", "_run(", "launch_main(")


def _launches(fn) -> bool:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return any(s in source for s in _LAUNCHES)


# The longest files (`make test`'s per-file wall time on the 2-core machine), longest first. Only
# the order changes: pytest-xdist (--dist loadfile --no-loadscope-reorder, see the Makefile) hands
# files to workers in collection order, so a long file collected last would run alone at the end
# while the other worker idles. (Without --no-loadscope-reorder, xdist orders files by their
# number of tests instead, which says nothing about their time.)
LONGEST_FIRST = ("test_resume.py", "test_users_data.py", "test_exact_resume.py", "test_reliability.py",
                 "test_augreg.py", "test_bench_train.py", "test_report.py", "test_user_flows.py", "test_fewshot.py",
                 "test_end_to_end.py", "test_fp8.py", "test_fault_tolerance.py", "test_finetune_surgery.py",
                 "test_zero_engine.py", "test_spawn.py", "test_convert_deepspeed.py", "test_multinode.py",
                 "test_launch.py", "test_dedup.py")


def pytest_configure(config) -> None:
    """One folder for the runs tests share (tests/runs.py: shared), made by the first pytest
    process; pytest-xdist workers inherit it from the controller's environment."""
    if SHARED_ENV not in os.environ:
        os.environ[SHARED_ENV] = tempfile.mkdtemp(prefix="vitscale-shared-")
        config._vitscale_shared = os.environ[SHARED_ENV]


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "_vitscale_shared", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ[SHARED_ENV]


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_launches(fn) for fn in [getattr(item, "function", None), *fixtures] if fn is not None):
            item.add_marker(pytest.mark.slow)
    order = {id(item): i for i, item in enumerate(items)}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.fspath.basename, len(rank)), order[id(item)]))
