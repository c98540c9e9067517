# One command per task; README and .ci/run call these targets.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint format bench demo fashion-mnist results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision: the releases this machine keeps on disk (a CUDA build that runs on the CPU)
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[jobs,service,experiment,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The packages mypy checks strictly (settings in pyproject.toml's [tool.mypy]); add to the list.
MYPY_STRICT := topk jobs/contract

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(MYPY_STRICT)

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint
	$(BIN)/python -m pytest -q

# The evidence report: trains the grid (resuming), then writes docs/results.md and docs/results/.
# The full protocol where torch sees a GPU, else the reduced CPU grid (71 minutes on 2 cores);
# override with RESULTS_CONFIG=..., and CONCURRENCY=N for the runs trained at once.
RESULTS_CONFIG ?= $(shell $(BIN)/python -c "import torch; print('experiments/paper.yaml' if torch.cuda.is_available() else 'experiments/paper-cpu.yaml')" 2>/dev/null || echo experiments/paper-cpu.yaml)
CONCURRENCY ?=

results: setup fashion-mnist
	$(BIN)/topk experiment $(RESULTS_CONFIG) --report docs/results.md $(if $(CONCURRENCY),--concurrency $(CONCURRENCY))

bench: setup
	$(BIN)/python benchmarks/bench_losses.py

# The demo's data: Debian's Fashion-MNIST package where apt is usable (root); otherwise the demo
# downloads the official files and checks them by SHA-256.
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: setup fashion-mnist
	$(BIN)/topk demo

clean:
	rm -rf $(VENV) .pytest_cache
