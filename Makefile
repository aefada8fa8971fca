# Two commands do all set-up on a fresh machine:
#   make run    the main job (retrain flow) on the embedded defaults, no network, no servers
#   make test   the whole test suite
# Both create .venv and install what they need (torch first, pinned to the CPU build).

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Both tools phone home by default; this project never needs the network at run time.
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The ephemeral Prefect API starts in ~5 s on an idle laptop; a busy 2-core box needs more than the default 20.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: anything looser pulls gigabytes of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/metaloop run

test: setup
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check metaloop tasks flows tests

clean:
	rm -rf data/curated data/episodes artifacts mlruns mlartifacts mlflow.db
