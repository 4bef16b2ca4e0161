# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qktrace-installed

.PHONY: demo test lint typecheck pytest bench train-demo install browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the local CPU build; an unpinned torch would pull GBs of CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,server,scale]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qktrace demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench recipes
	$(VENV)/bin/ruff format --check src tests bench recipes

typecheck: $(STAMP)
	$(VENV)/bin/mypy

browser:
	bash scripts/ensure-chromium.sh

pytest: $(STAMP) browser
	bash scripts/pytest.sh

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) bench/bench_qk.py
	$(PY) bench/bench_graph.py
	$(PY) bench/bench_dashboards.py
	$(PY) bench/bench_explain.py

DEMO_MODEL := src/qktrace/demo/assets/model

# Regenerates the shipped demo (32 minutes measured on 2 CPU cores) with the recipe in recipes/demo (beside the
# package, run from the repository root): the model from scratch, then a shorter stage that weights facts,
# multiple choice and yes/no more; then the SAEs and their dashboards (qktrace.jobs.dashboards), then the
# transcoders and hook_z attention SAEs of the strategy-2 case study (about 6 more minutes).
train-demo: $(STAMP)
	$(PY) -m recipes.demo.train --out $(DEMO_MODEL)
	$(PY) -m recipes.demo.train --init $(DEMO_MODEL) --out $(DEMO_MODEL) --mix stage2 --steps 2600 --lr 1e-3 --minutes 22
	$(PY) -m recipes.demo.train_saes
	$(PY) -m recipes.demo.dashboards
	$(PY) -m recipes.demo.train_transcoders

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache .mypy_cache
