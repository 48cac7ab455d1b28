# One target per habit; CI (.ci/run) calls the same targets.
# Every target that needs the virtual environment installs it first (idempotent).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Keep LaminDB state inside the project, never in ~/.lamin.
export LAMIN_SETTINGS_DIR ?= $(CURDIR)/.lamin/settings
export LAMIN_CACHE_DIR ?= $(CURDIR)/.lamin/cache

.PHONY: install demo test test-default test-postgres test-s3 postgresql test-fast lint format typecheck bench bench-quick bench-upload docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk (an unpinned torch pulls CUDA).
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,lint,types,bench,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m lamin_lightning._demo

# The whole suite (LaminDB tier on SQLite + local storage), then the tier's contract tests
# on PostgreSQL + local storage and on SQLite + S3 (moto). One pytest process per backend:
# lamindb holds one instance per process. The servers are started and stopped by the tests.
test: test-default test-postgres test-s3

test-default: install
	$(PY) -m pytest -q

test-postgres: install postgresql
	LAMIN_LIGHTNING_TIER_BACKEND=postgres $(PY) -m pytest -q -m contract tests/lamindb

test-s3: install
	LAMIN_LIGHTNING_TIER_BACKEND=s3 $(PY) -m pytest -q -m contract tests/lamindb

# The PostgreSQL server binaries for test-postgres: installed (as root) only when missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 \
	  || { echo "pg_ctl not found: installing PostgreSQL (apt-get install -y postgresql)"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: install
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/run.py

bench-quick: install
	$(PY) benchmarks/run.py --quick

# The 1 GiB upload benchmark (about 10 minutes): its own target, so that `make bench`
# stays under 20 minutes.
bench-upload: install
	$(PY) benchmarks/run.py upload

# The documentation site, strictly (a warning fails the build), into site/. Offline.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf .lamin .pytest_cache .mypy_cache .ruff_cache benchmarks/results site
