# The commands a user needs: `make demo`, `make serve` and `make test`.
PY      := .venv/bin/python
TORCH   := torch==2.13.0
STAMP   := .venv/.installed
MODEL   := src/stablediff/data/shapes.safetensors

.PHONY: setup test demo serve lint clean bundled-model eval bench

setup: $(STAMP)

# torch is pinned first: this machine has the CPU build of 2.13.0 on disk, and an
# unpinned install would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,reference,serve]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Generates one image with the bundled model and prints where it is, and which model that is.
demo: setup
	$(PY) -m stablediff generate "a large yellow star in the center on a black background" --seed 1 --steps 20 --out outputs
	@$(PY) -c 'import re; from stablediff.weights.io import read_metadata; r = read_metadata("$(MODEL)")["stablediff.recipe"]; \
	print("made by the bundled model $(MODEL), trained by the recipe", re.search("^name = \"(.+)\"", r, re.M)[1], \
	"(shapes-gpu: docs/model-card.md; shapes, the CPU recipe: docs/speedrun.md)")'

# The web page and the HTTP APIs on http://127.0.0.1:7860/ with the bundled model (docs/serve.md).
serve: setup
	$(PY) -m stablediff serve

# Trains a bundled model from nothing and evaluates it: RECIPE=shapes (CPU, about 2 hours on two
# cores) or RECIPE=shapes-gpu (a CUDA GPU: the model that ships; docs/model-card.md has its phases' times).
RECIPE  ?= shapes
bundled-model: setup
	$(PY) -m stablediff train recipe $(RECIPE) --out runs/$(RECIPE) --package $(MODEL)

# The full evaluation of the bundled model: prompt suites, sampler/steps/guidance sweep.
eval: setup
	$(PY) -m stablediff eval --n 200 --sweep --out docs/eval

# Speed and memory against diffusers on this machine (docs/benchmarks.md): about 40 minutes on two
# cores; run it with nothing else on the machine. Results in benchmarks/results/.
bench: setup
	$(PY) benchmarks/cpu_generate.py
	$(PY) benchmarks/peak_rss.py --cases 512,512-diffusers,1024,1024-diffusers

# The linter and the formatter's check over every Python file (CI runs it before the tests).
lint: setup
	.venv/bin/ruff check src tests benchmarks tools
	.venv/bin/ruff format --check src tests benchmarks tools

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
