# fedseg: `make study` runs the whole chain (laptop profile), `make test` the tests. Each creates and
# fills .venv from the pinned requirements first, so a fresh machine needs only Python 3.11-3.12 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= laptop
ARGS ?=

.PHONY: install study test lab bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[lab,test]"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(BIN)/python -m fedseg run --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# JupyterLab on the repository, so the notebooks' links to docs/, results/ and README.md open; 00_index first
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=. notebooks/00_index.ipynb

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data_pipeline.py --profile $(PROFILE)

clean-venv:
	rm -rf $(VENV)
