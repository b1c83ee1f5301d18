# Everyday verbs. `make demo` and `make test` each work on a fresh clone: they install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURES ?= fixtures
# make all-recipes MODEL=Qwen/Qwen2-VL-7B-Instruct DATASET=data/ GPUS=auto
MODEL ?= Qwen/Qwen2-VL-7B-Instruct
DATASET ?= $(FIXTURES)/data
GPUS ?= auto
RECIPES ?= all
ARGS ?=
# Where the venv is not the way in (a GPU image with its own Python): RECIPE_RUN="python3 -m recipe_runner"
RECIPE_RUN ?= $(VENV)/bin/recipe-run

.PHONY: install test test-fast lint format fixtures demo demo-search all-recipes bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The inner loop: no real training, no Ray cluster (under 3 minutes on 2 cores); `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not ray"

# Style, the layers (import-linter: no cycles, no lower layer importing a higher one) and the types of the
# torch-free code (mypy).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

fixtures: $(STAMP)
	$(PY) -m src.fixtures --out $(FIXTURES)

demo: $(STAMP)
	$(VENV)/bin/recipe-run demo --fixtures $(FIXTURES) $(ARGS)

# The demo's question asked fairly: each recipe at its own best rate (5 rates around the demo's, halving 3),
# chosen on a validation split, scored once on the test split.
demo-search: $(STAMP)
	$(VENV)/bin/recipe-run demo --fixtures $(FIXTURES) --lr-search $(ARGS)

all-recipes: $(if $(filter $(VENV)/bin/recipe-run,$(RECIPE_RUN)),$(STAMP))
	$(RECIPE_RUN) --recipes $(RECIPES) --gpus $(GPUS) --model-id $(MODEL) --dataset $(DATASET) $(ARGS)

# On a GPU machine; BENCH=--shape tiny --cpu is the CI smoke run. Add --candidates (the planner's top 3),
# --end-to-end (a whole worker run) or --profile plain,fast for the why; 16 samples a step by default.
BENCH ?= --shape 2b --shape 7b
bench: $(if $(filter $(VENV)/bin/recipe-run,$(RECIPE_RUN)),$(STAMP))
	$(RECIPE_RUN) bench $(BENCH) --out bench-out

clean:
	rm -rf $(FIXTURES) outputs .pytest_cache bench-out .bench-work
