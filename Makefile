# ftlaunch: `make demo` runs the main job on the embedded local Ray head; `make test` passes the tests.
# Both build .venv themselves (torch==2.13.0 first: an unpinned torch pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ftlaunch-installed
EXTRAS ?= train,deepspeed,qlora,k8s,report,dev
PYTEST_ARGS ?=

.PHONY: demo test test-unit lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Makes the demo data, starts the embedded head (unless one runs), submits the demo spec, prints
# the summary, and stops the head it started (KEEP_CLUSTER=1 keeps it).
demo: $(STAMP)
	@$(BIN)/ftlaunch data make demo --rows 4000 --out data/demo
	@started=0; $(BIN)/ftlaunch cluster status >/dev/null 2>&1 || { $(BIN)/ftlaunch cluster up && started=1; }; \
	status=0; $(BIN)/ftlaunch submit configs/demo.yaml || status=$$?; \
	if [ $$started = 1 ] && [ -z "$(KEEP_CLUSTER)" ]; then $(BIN)/ftlaunch cluster down; fi; \
	exit $$status

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, import order, line length 120.
lint: $(STAMP)
	$(BIN)/ruff check .

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs data/demo bench/work
