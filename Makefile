# Two commands do all the setup on a fresh machine:
#   make demo   installs what is missing, runs the showcase on FashionMNIST
#   make test   installs what is missing, runs the test suite
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_FILE := $(FMNIST_DIR)/train-images-idx3-ubyte.gz

.PHONY: demo test test-all bench peers fmnist fmnist-optional clean

# constraints.txt pins the versions the committed results ran with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[test,tfds]'
	@touch $(STAMP)

# FashionMNIST comes from Debian's dataset-fashion-mnist package (offline IDX files).
fmnist:
	@if [ ! -f $(FMNIST_FILE) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing dataset-fashion-mnist with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "FashionMNIST not found in $(FMNIST_DIR)."; \
	    echo "Install it with: sudo apt-get install dataset-fashion-mnist"; \
	    echo "or put the four IDX .gz files in a directory and run: make demo FMNIST_DIR=<dir>"; \
	    exit 1; \
	  fi; \
	fi

# Tests that need FashionMNIST skip (with a reason) when it cannot be installed.
fmnist-optional:
	-@$(MAKE) --no-print-directory fmnist

# The attack x defence showcase (experiments/demo.py); extra flags, e.g.
#   make demo DEMO_FLAGS='--aggregators=fedavg,safesparse,trimmed_mean'
demo: $(STAMP) fmnist
	$(PYTHON) -m experiments.demo --data_dir=$(FMNIST_DIR) $(DEMO_FLAGS)

test: $(STAMP) fmnist-optional
	$(PYTHON) -m pytest -q

test-all: $(STAMP) fmnist-optional
	$(PYTHON) -m pytest -q -m ''

bench: $(STAMP)
	$(PYTHON) -m benchmarks.round_throughput

# The peers the benchmarks and oracle tests compare with (optional): a
# CPU-only torch and ByzFL, whose package imports torchvision only for its
# own training benchmark (fedjax_sparse/testing/byzfl.py). TORCH=torch
# takes the newest release instead of the pinned CPU build.
TORCH ?= torch==2.13.0
peers: $(STAMP)
	$(PYTHON) -m pip install -q '$(TORCH)' 'scipy>=1.12'
	$(PYTHON) -m pip install -q --no-deps 'byzfl==0.0.11'

clean:
	rm -rf $(VENV) demo_results .pytest_cache
