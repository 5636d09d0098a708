# The README's commands. `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench lock clean

# constraints.txt: the exact versions the suite last passed on (`make lock` refreshes it).
$(BIN)/wf: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/wf

demo: setup
	$(BIN)/wf demo

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -ra --durations=20

bench: setup
	$(BIN)/python benchmarks/extract_throughput.py

# The newest versions pyproject.toml allows, in a venv of their own, written to constraints.txt.
# Then `make clean test` on them, and commit constraints.txt only if it passes (and, if Ray
# moved, deploy/Dockerfile and deploy/kuberay/rayjob.yaml to the same Ray: tests/test_deploy.py).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	echo '# The exact versions the suite last passed on; `make lock` rewrites this file.' > constraints.txt
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^wf[= @]' >> constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) wf-demo .pytest_cache
