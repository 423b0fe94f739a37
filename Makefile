# gridvqa — `make train` and `make test` do all set-up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data/shapes
PYTEST_ARGS ?=

# No network at run time: hub libraries stay offline, wandb uses its own offline mode unless a key is set.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install data pretrain train reproduce test test-slow test-all lint clean-data

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install gridvqa with its dev tools (quick when nothing changed)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

data: $(DATA)/answers.json  ## generate the built-in synthetic data set and its vocabularies

$(DATA)/answers.json: | $(STAMP)
	$(BIN)/python -m gridvqa.data.synthetic $(DATA)
	$(BIN)/python -m gridvqa.data.prepare $(DATA)

PRETRAINED := artifacts/pretrain_vg/backbone.safetensors
# Hydra overrides passed to every training command (e.g. TRAIN_ARGS="trainer.max_epochs=1").
TRAIN_ARGS ?=
DATA_ARG := paths.data_root=$(abspath $(DATA))

pretrain: $(PRETRAINED)  ## VG detector pre-training of the grid backbone (skipped when its weights exist)

$(PRETRAINED): | $(DATA)/answers.json
	$(BIN)/python -m gridvqa.train experiment=pretrain_vg $(DATA_ARG) $(TRAIN_ARGS)

train: install data pretrain  ## data, VG pre-training, then the main job: end-to-end VQA training
	$(BIN)/python -m gridvqa.train experiment=e2e $(DATA_ARG) $(TRAIN_ARGS)

# Overrides of conf/reproduce.yaml (e.g. REPRODUCE_ARGS="seeds=[1] dry_run=true").
REPRODUCE_ARGS ?=

reproduce: install data  ## the paper's findings on the built-in data -> results/ and docs/results.md (resumes)
	$(BIN)/python -m gridvqa.reproduce $(DATA_ARG) $(REPRODUCE_ARGS)

test: install  ## run the quick test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install  ## run only the tests marked slow
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install  ## run every test
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: install  ## ruff
	$(BIN)/ruff check .

clean-data:  ## remove the generated built-in data
	rm -rf $(DATA)
