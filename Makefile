# The two commands of the README: `make run` (set up + main job) and `make test` (the whole suite).
# Both create .venv on first use, so a fresh clone needs nothing but python3 >= 3.11.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: run test lint bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[all]'
	touch $(STAMP)

run: $(STAMP)
	.venv/bin/masml main

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_cohort.py
	$(PY) bench/bench_evaluation.py
	$(PY) bench/bench_predict.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_scale.py --rows 100000 1000000
