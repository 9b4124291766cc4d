# The course's two commands (each sets itself up on a fresh machine):
#   make course   run every notebook end to end through papermill into output/ (not committed)
#   make test     the test suite: unit tests, papermill -p runs, browser test, and pytest --nbval
# Size of the runs: COURSE_PRESET=smoke|quick|full (default: full on a GPU, quick on a CPU).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= output
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: course test lab setup clean-output

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[course]"
	touch $@

course: $(VENV)/.ready
	mkdir -p $(OUT)
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (COURSE_PRESET=$${COURSE_PRESET:-auto})"; start=$$(date +%s); \
	  $(BIN)/papermill --cwd notebooks --kernel python3 --progress-bar $$nb $(OUT)/$$(basename $$nb) || exit 1; \
	  echo "   $$(( $$(date +%s) - start )) s -> $(OUT)/$$(basename $$nb)"; \
	done

test: $(VENV)/.ready
	COURSE_PRESET=smoke $(BIN)/python -m pytest $(NBVAL) --ignore-glob='tests/*.ipynb' tests notebooks

lab: $(VENV)/.ready
	$(BIN)/jupyter lab notebooks

clean-output:
	rm -rf $(OUT)
