# Two commands on a fresh clone: `make run` (the pipeline on built-in synthetic data) and
# `make test` (the test suite). Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UI_PORT ?= 5000

# Stages in dvc.yaml call `frcnn`, which lives in the venv.
export PATH := $(abspath $(BIN)):$(PATH)
# No DVC telemetry, unbuffered logs. (The local Ray clusters the stages start set their own
# environment: pipeline/ray_session.py.)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test ui docs install clean constraints

# Installs the tested versions (constraints.txt) of what pyproject.toml asks for.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,optuna]'
	touch $(STAMP)

# Refresh constraints.txt: resolve pyproject.toml afresh in a scratch venv and freeze it; then
# `make test` on the new versions before committing the file.
constraints:
	rm -rf .venv-refresh && $(PYTHON) -m venv .venv-refresh
	.venv-refresh/bin/pip install --quiet --upgrade pip
	.venv-refresh/bin/pip install --quiet -e '.[test,optuna]'
	{ echo "# The versions the test suite passed with (pip freeze of make's .venv)."; \
	  echo "# make install uses them (pip install -c constraints.txt); refresh: make constraints, then make test."; \
	  .venv-refresh/bin/pip freeze --exclude-editable | grep -v '^frcnn'; } > constraints.txt
	rm -rf .venv-refresh

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro
	@test -f metrics/evaluate.json && cat metrics/evaluate.json || true

# Two processes, a test file each at a time: the real Ray / MLflow / DVC tests spend most of
# their time waiting (process start-up, Ray's scheduling), so two of them overlap well on 2 cores.
# Then the learning tests again on torch's plain C++ kernels (no SIMD): seeded initialisation and
# every float sum take another path there, as on a CPU with another vector unit, so a test that
# holds only on this machine's path fails here rather than on a user's machine.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -n 2 --dist load -m learning

# The store the stages log to: tracking.uri from params.yaml, or $MLFLOW_TRACKING_URI.
ui: $(STAMP)
	@uri="$$($(BIN)/python -m pipeline.tracking uri)" || exit 1; \
	case "$$uri" in \
	  http://*|https://*) echo "tracking.uri is a tracking server: open $$uri";; \
	  *) echo "MLflow UI on http://127.0.0.1:$(UI_PORT) for $$uri"; \
	     exec $(BIN)/mlflow ui --backend-store-uri "$$uri" --host 127.0.0.1 --port $(UI_PORT);; \
	esac

# The README's pictures (docs/*.png) from the outputs of `make run` (and a screenshot of the MLflow
# UI, with Debian's chromium: apt-get install chromium).
docs: $(STAMP)
	$(BIN)/python docs/render.py

clean:
	rm -rf data/prepared models metrics reports sweeps checkpoints ray_results
