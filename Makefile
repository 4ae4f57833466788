# The two set-up commands of the README: `make demo` and `make test` (everything, the property tests at full
# strength); `make unit`: the tests that start no process and are not `slow` (tests/conftest.py marks them
# `unit`), property tests with a tenth of their examples, for a quick check while editing.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test unit lint typecheck pytest bench bench-smoke clean

$(BIN)/tiled-writer-sidecar: pyproject.toml uv.lock
	scripts/bootstrap.sh
	@touch $@

demo: $(BIN)/tiled-writer-sidecar
	$(BIN)/tiled-writer-sidecar demo

test: $(BIN)/tiled-writer-sidecar
	scripts/system-deps.sh
	$(MAKE) lint typecheck pytest

lint:
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -n 3 --dist load --hypothesis-profile=ci

# Two workers: each imports the whole suite first, and the unit layer waits on little but the CPU.
unit: $(BIN)/tiled-writer-sidecar
	$(BIN)/pytest -m unit -n 2 --dist load

bench: $(BIN)/tiled-writer-sidecar
	$(BIN)/python -m benchmarks.run

bench-smoke: $(BIN)/tiled-writer-sidecar
	$(BIN)/python -m benchmarks.run --smoke

clean:
	rm -rf $(VENV) .bootstrap dist .pytest_cache .mypy_cache .ruff_cache
