# `make test` and `make run` each create .venv (python3.11) when missing and install the package first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A new .venv takes about 6.6 GiB (torch 2.14.1 is a CUDA build with its nvidia libraries): say so before pip fills the disk.
VENV_NEEDS_GIB ?= 7

.PHONY: run test install clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
		sys.exit(None if free >= $(VENV_NEEDS_GIB) else f"a new $(VENV) needs about $(VENV_NEEDS_GIB) GiB of disk, {free:.1f} GiB free")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 come from local disk; other torch releases break torchvision here.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev,video,demo]"
	# lmms-eval for tests/test_lmms_eval_plugin.py, without its full requirements (av<16 and python-dateutil<3 would
	# replace the versions above): the package plus what its evaluation path imports.
	$(PY) -m pip install --no-deps lmms-eval==0.7 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
		pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1
	$(PY) -m pip install accelerate==1.15.0 loguru==0.7.3 sacrebleu==2.6.0 evaluate==0.4.6 tenacity==9.2.1
	touch $(STAMP)

install: $(STAMP)

# tests/test_demo_browser.py drives Debian's chromium through Playwright: install chromium when it is missing and apt-get
# is usable (as root, or through sudo without a password); otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
			as_root=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
			$$as_root apt-get update -qq && $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
				|| echo "make: installing chromium with apt-get failed; the browser test will skip"; \
		else echo "make: chromium is missing and apt-get is not usable here; the browser test will skip"; fi; }

test: $(STAMP) browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q tests

# `make run`: every registered reducer that reduces images to a budget (all but the omni-only seats) at about 25%,
# 11% and 6% of ref-llava-e2e's 256 visual tokens, plus `none` and the two oracle diagnostics (not registered reducers, so
# named here), on the first RUN_LIMIT synthvqa test questions (whole scenes, every question type); prints the table,
# writes the plot.
RUN_OUT := outputs/make_run
RUN_LIMIT ?= 490
RUN_KEEPS ?= 64,28,16

run: $(STAMP)
	rm -rf $(RUN_OUT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/tokenomy eval --model ref-llava-e2e --tasks synthvqa \
		--reducers "$$($(PY) -c 'from tokenomy.reducers import available; print(",".join(available(images=True)))'),oracle-question,oracle-foreground" \
		--keep $(RUN_KEEPS) --limit $(RUN_LIMIT) --batch_size 15 --output_path $(RUN_OUT)
	$(VENV)/bin/tokenomy report $(RUN_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
