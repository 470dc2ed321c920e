# Two commands for a fresh clone: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_ARGS ?=

.PHONY: install demo compare test lint format bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes; the project itself is installed editable.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[cpu,weights,test]"
	@touch $(STAMP)

# The product on the built-in collection: photos to a served, self-trained index, queried over
# HTTP, with the run report (about 15 minutes on 2 CPU cores); Ctrl-C stops the service.
demo: $(STAMP)
	$(BIN)/python -m pipeline.demo $(DEMO_ARGS)

# Off-the-shelf networks and poolings compared on the built-in collection (or --photos DIR).
compare: $(STAMP)
	$(BIN)/python -m pipeline.compare $(COMPARE_ARGS)

# The tests in two pytest sessions side by side (tests/lanes.py); `pytest` alone runs them in one.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m tests.lanes

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m bench.extract --out bench/results/extract_cpu.json
	$(BIN)/python -m bench.extract --pipeline --images 373 --rounds 2 --out bench/results/extract_pipeline_cpu.json
	$(BIN)/python -m bench.index --out bench/results/index_cpu.json
	$(BIN)/python -m bench.rank --out bench/results/rank_cpu.json
	$(BIN)/python -m bench.search --out bench/results/search_cpu.json
	$(BIN)/python -m bench.sfm --out bench/results/sfm_real_cpu.json
	$(BIN)/python -m bench.sfm --scaling --out bench/results/sfm_scaling_cpu.json
	$(BIN)/python -m bench.mining --out bench/results/mining_cpu.json
	$(BIN)/python -m bench.train --out bench/results/train_cpu.json

# The GPU checks (bench/gpu.py via bench/gpu.sh): on a GPU machine the full run, here the dry
# run on the CPU; `bash bench/gpu.sh pack` first packs the wheels a bare GPU machine lacks.
.PHONY: bench-gpu
bench-gpu:
	bash bench/gpu.sh $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .mypy_cache
