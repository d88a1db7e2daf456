# ftlaunch: `make demo` runs the main job on the embedded local Ray head; `make test` passes the tests.
# Both build .venv themselves (torch==2.13.0 first: an unpinned torch pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FTLAUNCH ?= $(BIN)/ftlaunch
STAMP  := $(VENV)/.ftlaunch-installed
EXTRAS ?= train,deepspeed,qlora,k8s,report,tracking,dev
PYTEST_ARGS ?=

.PHONY: demo test test-unit lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Makes the demo model folder and chat data (unless there), starts the embedded head (unless one
# runs), fine-tunes (configs/demo.yaml), prints the summary (exact match before -> after), asks the
# trained model one eval question, and stops the head it started (KEEP_CLUSTER=1 keeps it).
DEMO_QUESTION := tell me the colour of the mundle.
DEMO_SYSTEM   := You answer in one short sentence.

demo: $(STAMP)
	@[ -f models/q/config.json ] || $(FTLAUNCH) model make qwen2 --out models/q
	@[ -f data/chat/eval.jsonl ] || $(FTLAUNCH) data make chat --out data/chat --format jsonl
	@started=0; $(FTLAUNCH) cluster status >/dev/null 2>&1 || { $(FTLAUNCH) cluster up && started=1; }; \
	run=demo-chat-$$(date +%Y%m%d-%H%M%S); status=0; \
	$(FTLAUNCH) submit configs/demo.yaml --submission-id $$run || status=$$?; \
	if [ $$status = 0 ]; then \
	  echo "ftlaunch infer runs/$$run --input \"$(DEMO_QUESTION)\" --system \"$(DEMO_SYSTEM)\""; \
	  $(FTLAUNCH) infer runs/$$run --input "$(DEMO_QUESTION)" --system "$(DEMO_SYSTEM)" || status=$$?; \
	fi; \
	if [ $$started = 1 ] && [ -z "$(KEEP_CLUSTER)" ]; then $(FTLAUNCH) cluster down; fi; \
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
	rm -rf $(VENV) runs data/demo data/chat models/q bench/work
