# `make test` and `make run` each create .venv (python3.11) when missing and install the package first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 come from local disk; other torch releases break torchvision here.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev,video,demo]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q tests

run: $(STAMP)
	$(VENV)/bin/tokenomy --help

clean:
	rm -rf $(VENV) build *.egg-info
