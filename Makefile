# Two entry points on a fresh machine:  make bench  (the benchmark on its default)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: bench test lint deps venv clean

$(VENV)/.installed: pyproject.toml setup.py src/pyvhost/_sigbus.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(VENV)/bin/pyvhost compile
	touch $@

venv: $(VENV)/.installed

## Debian packages the tests drive: DPDK's testpmd (virtio-user front-end and vhost PMD back-end), QEMU and the
## guest kit of the VM tests (tools/guestkit: a Debian kernel and a busybox initramfs, cached outside the repo).
deps:
	tools/install-debian-deps.sh

bench: venv
	$(VENV)/bin/pyvhost bench

## The habits that keep the tree readable: lint, format and types (configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/mypy

test: lint deps
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
