# REBECA kit. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
# These machines: the CPU-capable pair that open_clip's torchvision needs. On a GPU box: `make ... TORCH_PINS=`
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP ?= $(VENV)/.rebeca-installed
KERNEL ?= rebeca
RUN = $(PY) -m rebeca_utils.run
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: install demo test test-fast smoke paper lab bench clean-outputs

$(STAMP): pyproject.toml
	@s=$$SECONDS; \
	if [ ! -x "$(PY)" ]; then echo "== creating $(VENV)"; $(PYTHON) -m venv $(VENV) || exit 1; fi; \
	echo "== installing the kit into $(PY)"; \
	if [ -n "$(TORCH_PINS)" ]; then $(PY) -m pip install -q $(TORCH_PINS) || exit 1; fi; \
	$(PY) -m pip install -q -e . || exit 1; \
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (rebeca kit)" >/dev/null || exit 1; \
	mkdir -p $(dir $(STAMP)) && touch $(STAMP); \
	echo "== install done in $$((SECONDS - s)) s"

install: $(STAMP)

demo: install
	@s=$$SECONDS; $(RUN) --profile demo --only 01 && echo "== demo done in $$((SECONDS - s)) s"

test: install
	@s=$$SECONDS; HF_HUB_OFFLINE=1 $(PY) -m pytest --durations=15; rc=$$?; \
	echo "== tests done in $$((SECONDS - s)) s"; exit $$rc

test-fast: install
	@s=$$SECONDS; HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" --durations=10; rc=$$?; \
	echo "== fast tests done in $$((SECONDS - s)) s"; exit $$rc

smoke: install
	$(RUN) --profile smoke

paper: install
	$(RUN) --profile paper

lab: install
	$(PY) -m jupyter lab notebooks/

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m rebeca_utils.bench

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
