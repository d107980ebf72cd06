# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# `make test-latest` runs the tests against the newest release of every dependency (run it before each landing);
# `make constraints` then moves requirements/constraints.txt forward to those releases.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-latest constraints lint typecheck unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh requirements/constraints.txt
	rm -rf $(VENV)
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseft demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

unit: $(STAMP)
	$(PY) -m pytest

test: lint typecheck unit

# A fresh venv with the newest releases, then the same checks in it.
test-latest:
	rm -rf $(LATEST_VENV)
	bash scripts/setup_venv.sh --latest $(LATEST_VENV)
	touch $(LATEST_VENV)/.installed
	$(MAKE) VENV=$(LATEST_VENV) test
	@echo "newest releases tested: $(LATEST_VENV)/.freeze (make constraints pins them)"

constraints:
	test -f $(LATEST_VENV)/.freeze || { echo "run make test-latest first"; exit 1; }
	{ echo "# Exact versions that make test passed with; written by make constraints from make test-latest's venv."; \
	  grep -v '^-e ' $(LATEST_VENV)/.freeze | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(LATEST_VENV) build dist src/*.egg-info
