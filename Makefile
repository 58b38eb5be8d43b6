# paraformer-edu: the two commands of the README are `make book` and `make test`.
# Both do all the set-up on a fresh machine (a virtual environment in .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The corpus and other caches live inside the checkout, so a fresh clone builds its own.
export PARAFORMER_EDU_CACHE ?= $(CURDIR)/.cache
export PYTHONWARNINGS ?= ignore::DeprecationWarning:jupyter_client.connect
export MPLBACKEND ?= Agg
CHAPTERS := $(sort $(wildcard chapters/[0-9][0-9]_*.py))
NOTEBOOKS := $(CHAPTERS:.py=.ipynb)
# make test runs chapter 7's live training with a budget of steps, not minutes, so that a
# slow or busy machine trains the same model and meets the same bound (the stored outputs
# come from the 10-minute run of make book / make execute).
CI_TRAIN_STEPS ?= 250
NBVAL := --nbval --nbval-current-env --nbval-cell-timeout=3600 --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: book test setup export sync format execute check-sync html check-book clean

## book: set up, execute every chapter in order (stores outputs), build the HTML book
book: setup export sync execute html

## test: set up, check package and pairs are in sync, build the book, run pytest and nbval
test: setup
	$(BIN)/python tools/export.py --check
	$(BIN)/python tools/check_pairs.py
	$(BIN)/ruff format --check -q chapters/*.ipynb
	$(MAKE) --no-print-directory html
	@if [ -x "$$(command -v chromium)" ] && [ -x "$$(command -v chromedriver)" ]; then \
	  $(MAKE) --no-print-directory check-book; \
	else \
	  echo "check-book: NOT RUN: no browser on this machine (apt-get install chromium chromium-driver)"; \
	fi
	PARAFORMER_EDU_TRAIN_STEPS=$(CI_TRAIN_STEPS) $(BIN)/python -m pytest tests $(NOTEBOOKS) $(NBVAL) -q --durations=25

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

## export: write paraformer_edu/<module>.py from the chapters' exported cells
export: setup
	$(BIN)/python tools/export.py

## sync: update every chapter's .ipynb from its .py (inputs only; outputs kept)
sync: setup
	for f in $(CHAPTERS); do $(BIN)/jupytext --to ipynb --update -q $$f || exit 1; done

## execute: run chapters (all, or CH=01_speech_as_data) top to bottom in a fresh kernel, storing outputs
execute: setup
	for f in $(if $(CH),chapters/$(CH).ipynb,$(NOTEBOOKS)); do \
	  echo "executing $$f"; \
	  $(BIN)/jupytext --to ipynb --update -q $${f%.ipynb}.py && \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=3600 --log-level=WARN $$f || exit 1; \
	done

## format: format the chapters' code with ruff (line length 100), cell by cell, in both files of each pair
format: sync
	$(BIN)/ruff format -q chapters/*.ipynb
	for f in $(NOTEBOOKS); do $(BIN)/jupytext --to py:percent -q $$f -o $${f%.ipynb}.py || exit 1; done

check-sync: setup
	$(BIN)/python tools/export.py --check
	$(BIN)/python tools/check_pairs.py

## html: build the book from the stored outputs (Jupyter Book 1, warnings are errors)
# A clean build: an incremental one does not always copy changed static files (book.css).
html: setup
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . -W -n --keep-going -q

## check-book: open every page of the built book in headless Chromium; fail on what a reader would
## trip over (boxes too narrow, unrendered math, images without alt text or caption, broken links,
## build markers, unlabelled audio, JavaScript errors). Needs Debian's chromium and chromium-driver.
check-book: setup
	$(BIN)/python tools/check_book.py _build/html

clean:
	rm -rf _build
