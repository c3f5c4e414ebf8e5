# Two entry points, each from a fresh machine with only Python 3.11+:
#   make train   set up .venv and run the tutorial's fine-tuning job
#   make test    set up .venv with the test extras, check the format and lint (ruff), run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup setup-test train test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

train: setup
	$(BIN)/vitlab train --name cifar10-100_500 --dataset cifar10 --model_type ViT-B_16 --num_steps 100

test: setup-test
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q
