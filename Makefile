# vocalign developer entry points.
#
#   make demo       create .venv if missing, install vocalign, run recipes/demo.yaml
#   make test       create .venv if missing, install vocalign[dev], run the tests
#   make clean      remove build artefacts (build/, dist/, *.egg-info, caches); keeps runs/
#   make distclean  clean, and remove .venv too
#
# TORCH is the torch requirement installed before the project, on its own. The
# default is the CPU wheel this project is tested with. An unpinned `torch` from
# PyPI is a multi-GB CUDA build, and `pip install -e .` keeps whatever torch is
# already there, so GPU users choose their build here, for example
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
# Changing TORCH reinstalls on the next make.
#
# Installs are recorded by stamp files inside .venv that depend on pyproject.toml
# (and on TORCH), so a second `make test` goes straight to the tests.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k rewards -x"
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
# -q hides progress and "already satisfied" lines; warnings and errors still show.
PIP := $(VENV)/bin/python -m pip
PIP_QUIET := -q

.PHONY: demo test clean distclean FORCE

demo: $(VENV)/.installed
	$(VENV)/bin/vocalign train recipes/demo.yaml

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_QUIET) --upgrade pip

# Rewritten only when TORCH differs from the last install, so that the stamps
# below depend on the value of TORCH and not on every make.
$(VENV)/.torch-spec: FORCE | $(VENV)/bin/python
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-spec
	@echo "Installing $(TORCH), then vocalign (editable) into $(VENV) ..."
	$(PIP) install $(PIP_QUIET) $(TORCH)
	$(PIP) install $(PIP_QUIET) -e .
	touch $@

# The dev install is a superset of the plain one, so it stamps both.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch-spec
	@echo "Installing $(TORCH), then vocalign[dev] (editable) into $(VENV) ..."
	$(PIP) install $(PIP_QUIET) $(TORCH)
	$(PIP) install $(PIP_QUIET) -e '.[dev]'
	touch $(VENV)/.installed $@

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

FORCE:
