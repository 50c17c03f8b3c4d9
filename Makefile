# The Parameter-Efficiency Lab: two commands do all set-up on a fresh machine.
#   make lab    create .venv, install, start JupyterLab on labs/
#   make test   create .venv, install, run the unit tests and nbval over every lab
# Re-running either on a ready .venv installs nothing: the stamp file below is newer than the lock.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lablib-installed
PORT   ?= 8888
LABS   := $(sort $(wildcard labs/[0-9][0-9]_*.py))
# JupyterLab refuses to start as root without --allow-root; pass it only then.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test unit nbval browser-test notebooks doctor bench binder-check clean-venv help

help:
	@echo "make lab        set up .venv and start JupyterLab on labs/"
	@echo "make test       set up .venv, run unit tests + nbval over every lab, then the browser test"
	@echo "make browser-test  run every lab in JupyterLab in headless Chromium (skipped, saying so, without Chromium)"
	@echo "make notebooks  re-execute every labs/NN_*.py into its paired .ipynb (commit the result)"
	@echo "make doctor     check the environment (versions, JupyterLab extensions, Triton, data)"
	@echo "make bench      run bench/ scripts (seconds per lab, ratios)"
	@echo "make binder-check  build a fresh venv the way Binder does and run every lab in it"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The lock pins torch==2.13.0 (the CPU build on this machine); lablib goes in editable, without
# re-resolving anything the lock already fixed.
$(STAMP): binder/requirements.txt pyproject.toml binder/overrides.json | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r binder/requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp binder/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $(STAMP)

lab: $(STAMP)
	@echo "Starting JupyterLab on labs/ (Ctrl-C to stop). Open the URL printed below."
	$(VENV)/bin/jupyter lab --no-browser $(ALLOW_ROOT) --ip=127.0.0.1 --port=$(PORT) \
		--ServerApp.root_dir=labs

# One pytest run over unit tests and the notebooks, so the closing line counts every test.
# LABLIB_STATIC=1: nbval has no widget frontend, so panels draw their static figure.
# Then the browser test, after nbval so the labs' checkpoint cache is warm.
test: $(STAMP)
	LABLIB_STATIC=1 LABLIB_PROGRESS=0 $(PY) -m pytest tests labs --ignore=tests/test_browser.py \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg
	@$(MAKE) --no-print-directory browser-test

unit: $(STAMP)
	$(PY) -m pytest tests --ignore=tests/test_browser.py

# Every lab run in JupyterLab (started as `make lab` starts it) in headless Chromium, driven by Playwright for
# Python (pinned in tests/browser/requirements.txt, not in the Binder lock). Chromium comes from the OS
# (Debian: apt-get install chromium); Playwright's own browser download is never used.
CHROMIUM ?= $(firstword $(wildcard /usr/lib/chromium/chromium) $(shell command -v chromium chromium-browser 2>/dev/null))
BROWSER_STAMP := $(VENV)/.lablib-browser-installed

$(BROWSER_STAMP): tests/browser/requirements.txt $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r tests/browser/requirements.txt
	touch $(BROWSER_STAMP)

browser-test: $(STAMP)
ifeq ($(strip $(CHROMIUM)),)
	@echo "SKIPPED: browser test (tests/test_browser.py): no Chromium found."
	@echo "         Install it (Debian: apt-get install chromium) or set CHROMIUM=/path/to/chromium, then make browser-test."
else
	@$(MAKE) --no-print-directory $(BROWSER_STAMP)
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/test_browser.py
endif

nbval: $(STAMP)
	LABLIB_STATIC=1 LABLIB_PROGRESS=0 $(PY) -m pytest labs --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg

# Execute each .py lab into its paired .ipynb (outputs kept), static figures so the stored
# outputs do not depend on a widget frontend.
notebooks: $(STAMP)
	@for f in $(LABS); do \
		echo "executing $$f"; \
		LABLIB_STATIC=1 LABLIB_PROGRESS=0 $(VENV)/bin/jupytext --to ipynb --set-kernel python3 --execute $$f || exit 1; \
	done

doctor: $(STAMP)
	$(PY) -m lablib doctor

bench: $(STAMP)
	$(PY) bench/labs_runtime.py

# What Binder does: a fresh venv from binder/requirements.txt alone, then binder/postBuild, then every lab
# executed headless (nbval) with an empty checkpoint cache, as on a fresh Binder. Slow (a full install plus every
# lab cold); not part of `make test`: run it when the lock or postBuild changes (tests/test_browser.py wraps it
# as a slow test when LABLIB_BINDER_CHECK=1).
BINDER_VENV ?= /tmp/lablib-binder-venv
binder-check:
	rm -rf $(BINDER_VENV)
	$(PYTHON) -m venv $(BINDER_VENV)
	$(BINDER_VENV)/bin/python -m pip install --disable-pip-version-check -q -r binder/requirements.txt
	PATH=$(abspath $(BINDER_VENV))/bin:$$PATH bash binder/postBuild
	LABLIB_CACHE=$(abspath $(BINDER_VENV))/lablib-cache LABLIB_STATIC=1 LABLIB_PROGRESS=0 \
		$(BINDER_VENV)/bin/python -m pytest labs --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg

clean-venv:
	rm -rf $(VENV)
