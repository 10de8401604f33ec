# `make demo`: the main job on a built-in tiny default (CPU is fine); `make test`: the test suite.
# Both set up their own environment first (scripts/setup_env.sh).
PY := $(if $(VIRTUAL_ENV),python,.venv/bin/python)

.PHONY: setup demo test lint wheel-check
setup:
	@bash scripts/setup_env.sh

demo: setup
	@PY=$(PY) bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .

wheel-check: setup
	@bash scripts/check_wheel.sh
