# Thin aliases: each target is one `python -m course_utils` command (which works without make, on Windows
# too, and creates .venv with the tested versions from constraints.txt when it is missing).
#   make course   run every notebook end to end through papermill into output/ (not committed)
#   make test     the test suite, exactly as CI runs it
#   make lab | bench | doctor | book
# Size of the runs: COURSE_PRESET=smoke|quick|full (default: full on a CUDA GPU, quick otherwise).
PYTHON ?= python3

.PHONY: course test lab bench doctor book clean-output

course test lab bench doctor book:
	$(PYTHON) -m course_utils $@

clean-output:
	rm -rf output
