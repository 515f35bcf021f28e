# greenlab: `make install`, then `python -m greenlab +experiment=retfound_green`; `make test`.
PYTHON ?= python3

.PHONY: install test lint format bench bench-gpu efficiency docs docs-serve

install:  ## greenlab + every dependency (MinkowskiEngine built from source); safe to re-run
	$(PYTHON) -m pip install -e ".[dev,sweep,energy,docs]"
	PYTHON=$(PYTHON) bash scripts/install_minkowski.sh

TEST_WORKERS ?= 2

test:  ## the suite on TEST_WORKERS processes (pytest-xdist; a file with module-scoped runs stays on one worker)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

lint:
	$(PYTHON) -m ruff check greenlab tests scripts benchmarks
	$(PYTHON) -m ruff format --check greenlab tests scripts benchmarks

format:
	$(PYTHON) -m ruff format greenlab tests scripts benchmarks
	$(PYTHON) -m ruff check --fix greenlab tests scripts benchmarks

bench:  ## benchmarks; each writes benchmarks/results/<name>.json with the machine description
	$(PYTHON) -m benchmarks.sparse_backends
	$(PYTHON) -m benchmarks.sparse_backends --dims 3 --img 64 --batch 4 --steps 3
	$(PYTHON) -m benchmarks.training_steps
	$(PYTHON) -m benchmarks.data_pipeline
	$(PYTHON) -m benchmarks.energy_backends
	$(PYTHON) -m benchmarks.loader_cache
	$(PYTHON) -m benchmarks.volume_cache

bench-gpu:  ## the GPU check, one script under 10 minutes (benchmarks/gpu_check.py; --dry-run: on the CPU, tiny)
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

efficiency:  ## the efficiency study: 4 methods, one table + plots in experiments/efficiency (see its README)
	PYTHON=$(PYTHON) bash experiments/efficiency/run.sh

docs:  ## the documentation site into site/ (MkDocs; broken links and missing pages fail; tests/test_docs.py too)
	$(PYTHON) -m mkdocs build --strict

docs-serve:  ## the site at http://127.0.0.1:8000, rebuilt on every change
	$(PYTHON) -m mkdocs serve
