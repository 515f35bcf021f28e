# greenlab: `make install`, then `python -m greenlab +experiment=retfound_green`; `make test`.
PYTHON ?= python3

.PHONY: install test lint format bench bench-gpu efficiency

install:  ## greenlab + every dependency (MinkowskiEngine built from source); safe to re-run
	$(PYTHON) -m pip install -e ".[dev,sweep,energy]"
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

bench-gpu:  ## one short script for a lent GPU (a few minutes): SparK's real-loader profile, loader ratios, steps, energy
	$(PYTHON) -m benchmarks.spark_profile --steps 30
	$(PYTHON) -m benchmarks.data_pipeline --steps 30 --warmup 5
	$(PYTHON) -m benchmarks.data_pipeline --steps 20 --warmup 5 --paper-photos 1000 --only retfound_green sparse_cnn_mae data.num_workers=$$(nproc)
	$(PYTHON) -m benchmarks.training_steps --steps 40 --warmup 10 --variants compiled channels_last
	$(PYTHON) -m benchmarks.energy_backends --seconds 20

efficiency:  ## the efficiency study: 4 methods, one table + plots in experiments/efficiency (see its README)
	PYTHON=$(PYTHON) bash experiments/efficiency/run.sh
