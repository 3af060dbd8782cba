# Same commands locally and in CI. Each target bootstraps uv and the virtualenv on a fresh machine.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
SRC := edge_node coordinator export fl_protocol fedscan tests

.PHONY: all venv demo test test-all check fmt bench clean

all: check test

$(UV):
	@command -v uv >/dev/null 2>&1 || (curl -LsSf https://astral.sh/uv/install.sh | sh) || python3 -m pip install --user uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
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
	$(UV) run --frozen fedscan bench inference --json bench-out/inference.json

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache demo-out bench-out
