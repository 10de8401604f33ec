# `make demo`: the main job on a built-in tiny default (CPU is fine); `make test`: the test suite.
# Both set up their own environment first (scripts/setup_env.sh).
PY := $(if $(VIRTUAL_ENV),python,.venv/bin/python)

# test files run on up to 4 pytest workers (one per core), a file's tests on one worker (shared runs), the
# longest files first (tests/conftest.py: LONGEST_FIRST; --no-loadscope-reorder keeps that order)
JOBS := $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup demo test test-fast lint wheel-check
setup:
	@bash scripts/setup_env.sh

demo: setup
	@PY=$(PY) bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=15 tests

test-fast: setup  # the inner loop: no test that starts processes
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not slow" tests

lint: setup
	$(PY) -m ruff check .

wheel-check: setup
	@bash scripts/check_wheel.sh
