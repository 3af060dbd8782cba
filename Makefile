# Same commands locally and in CI. Each target bootstraps uv and the virtualenv on a fresh machine.
SHELL := /bin/bash
# uv itself: .ci/uv finds it (PATH, ~/.local/bin, python3 -m uv) or installs it, pip first.
UV ?= .ci/uv
PY := .venv/bin/python
SRC := edge_node coordinator export fl_protocol fedscan tests

.PHONY: all bootstrap venv demo test test-all check fmt bench clean

all: check test

bootstrap:
	@$(UV) --version

.venv/.synced: pyproject.toml uv.lock
	$(UV) sync --frozen --extra train
	@touch $@

venv: .venv/.synced

demo: venv
	$(UV) run --frozen fedscan demo --out demo-out

test: venv
	$(UV) run --frozen pytest -q --quick -m "not slow" -p no:cacheprovider

test-all: venv
	$(UV) run --frozen pytest -q -p no:cacheprovider

check: venv
	$(UV) run --frozen ruff format --check $(SRC)
	$(UV) run --frozen ruff check $(SRC)
	$(UV) run --frozen mypy

fmt: venv
	$(UV) run --frozen ruff format $(SRC)
	$(UV) run --frozen ruff check --fix $(SRC)

bench: venv
	$(UV) run --frozen fedscan bench inference --samples tests/fixtures/dicom --json bench-out/inference.json

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache demo-out bench-out
