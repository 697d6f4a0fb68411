# The two commands a newcomer needs: `make run` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast test-sqlite lint typecheck ci bench bench-autoscale soak clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "error: Python 3.11 not found; install it (python.org, pyenv, or apt-get install python3.11 python3.11-venv)"; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PY) is $$($(PY) -V 2>&1); CrossLogic needs Python 3.11: make PY=/path/to/python3.11 ..."; exit 1; }
	@echo "make: creating $(VENV) with $(PY)"
	@$(PY) -m venv $(VENV) || { rm -rf $(VENV); echo "error: venv creation failed (Debian/Ubuntu: apt-get install python3.11-venv)"; exit 1; }

# Reinstalls when a requirements file changes; constraints.txt pins every transitive package.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt constraints.txt
	@echo "make: installing dependencies into $(VENV) (the first time takes a few minutes)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

run: $(STAMP)
	@bash scripts/run.sh

# Extra pytest arguments: make test ARGS="apps/fleet -x"
test: $(STAMP)
	@bash scripts/test.sh $(ARGS)

# Everything but the tests marked slow (those that start processes or servers): under 90 s.
test-fast: $(STAMP)
	@bash scripts/test.sh -m "not slow" $(ARGS)

# The fast tier on SQLite, the embedded default of `make run` (the test database lives in memory).
test-sqlite: $(STAMP)
	@DATABASE_URL="sqlite:///$$(mktemp -d)/crosslogic.sqlite3" bash scripts/test.sh -m "not slow" --allow-sqlite $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy with django-stubs; what it checks is in pyproject.toml ([tool.mypy]).
typecheck: $(STAMP)
	$(BIN)/mypy

ci:
	@bash .ci/run

bench: $(STAMP)
	@test -f scripts/bench.sh || { echo "make bench: scripts/bench.sh is not in this checkout (see docs/benchmarks.md)"; exit 1; }
	@bash scripts/bench.sh

# Not CI: 30 minutes at 64 streams plus bad input; RSS, fds, Redis memory and p99 TTFT per minute
# (bench/soak.py; its own throwaway PostgreSQL and Redis). Shorter: make soak SOAK_ARGS="--minutes 5"
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The autoscaling replay (bench/autoscale_bench.py): a bursty day in 10 minutes per policy, three
# policies (~35 minutes). make bench-autoscale ARGS="--quick" for a smoke run.
bench-autoscale: $(STAMP)
	@bash scripts/bench.sh --autoscale $(ARGS)

clean:
	rm -rf $(VENV) var staticfiles
