# The two commands a user needs: `make demo` and `make test`.
PY      := .venv/bin/python
TORCH   := torch==2.13.0
STAMP   := .venv/.installed

.PHONY: setup test lint clean

setup: $(STAMP)

# torch is pinned first: this machine has the CPU build of 2.13.0 on disk, and an
# unpinned install would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,reference]" "$(TORCH)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
