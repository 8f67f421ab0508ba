# Every target works from a fresh clone: it creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_SILENT ?= true

.PHONY: help install test test-slow train fashion-mnist bench-clustering bench-dim-reduction bench-throughput bench-conv-layout sweep clean

# bench-clustering settings: make bench-clustering CONFIG=... DATASETS='mnist-sample fashion-mnist' (or DATA_DIR=...)
#   MINUTES=15 SEEDS='0 1 2' ARGS='...'
CONFIG ?= configs/clustering.yaml
DATASETS ?= mnist-sample fashion-mnist
DATA_DIR ?=
SEEDS ?=
MINUTES ?= 15
ARGS ?=
SWEEP ?= sweeps/clustering.yaml
COUNT ?= 10

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev extras

# --durations: every run (CI's too) names its slowest tests, to keep the suite under its 10 minutes
test: $(STAMP)  ## run the test suite (fast tests; under 10 minutes on 2 cores)
	$(PY) -m pytest -q --durations=10

test-slow: $(STAMP)  ## run the slow checks that make test leaves out (half a minute to two minutes each)
	$(PY) -m pytest -q -m slow

train: $(STAMP)  ## the main job: clustering on MNIST (DATA_DIR=... to point at the files)
	$(PY) -m aae_lightning fit --config configs/clustering.yaml $(if $(DATA_DIR),--data.data_dir=$(DATA_DIR))

FASHION := /usr/share/datasets/fashion-mnist

fashion-mnist:  ## Debian's dataset-fashion-mnist for the benchmarks, installed with apt-get where it is missing
	@test -d $(FASHION) || { command -v apt-get >/dev/null && apt-get install -y -q dataset-fashion-mnist; } || \
		{ echo "Fashion-MNIST is not in $(FASHION) and apt-get could not install it: run 'apt-get install dataset-fashion-mnist' as root, or pass DATASETS=mnist-sample"; exit 2; }

bench-clustering: $(STAMP) $(if $(and $(findstring fashion-mnist,$(DATASETS)),$(if $(DATA_DIR),,yes)),fashion-mnist)  ## purity/acc/NMI/ARI per epoch against wall time (CONFIG, DATASETS or DATA_DIR, MINUTES, SEEDS, ARGS)
	$(PY) benchmarks/clustering.py --config $(CONFIG) $(if $(DATA_DIR),--data-dir $(DATA_DIR),--datasets $(DATASETS)) \
		--minutes $(MINUTES) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ARGS),-- $(ARGS))

bench-dim-reduction: $(STAMP)  ## the 2-D map against PCA / t-SNE / UMAP on the MNIST sample (MINUTES, ARGS)
	$(PY) benchmarks/dim_reduction.py --datasets mnist-sample --minutes $(MINUTES) $(if $(ARGS),-- $(ARGS))

bench-throughput: $(STAMP) $(if $(DATA_DIR),,fashion-mnist)  ## samples/s of our fit path vs plain PyTorch loops, and GFLOP/s vs torch.mm
	$(PY) benchmarks/throughput.py --data-dir $(or $(DATA_DIR),/usr/share/datasets/fashion-mnist)

bench-conv-layout: $(STAMP)  ## seconds per batch of the conv configs' fit path, channels-last against contiguous feature maps
	$(PY) benchmarks/conv_layout.py --configs configs/clustering.yaml configs/semi_supervised_mnist_100.yaml

sweep: $(STAMP)  ## W&B sweep with no server (SWEEP, COUNT, ARGS appended to every trial)
	$(PY) -m aae_lightning sweep $(SWEEP) --count $(COUNT) $(if $(ARGS),-- $(ARGS))

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) runs
