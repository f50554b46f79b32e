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

.PHONY: install demo test test-fast smoke paper report lab lab-command git-filter bench rehearse clean-outputs

$(STAMP): pyproject.toml
	@s=$$SECONDS; \
	if [ ! -x "$(PY)" ]; then echo "== creating $(VENV)"; $(PYTHON) -m venv $(VENV) || exit 1; fi; \
	echo "== installing the kit into $(PY)"; \
	if [ -n "$(TORCH_PINS)" ]; then $(PY) -m pip install -q $(TORCH_PINS) || exit 1; fi; \
	$(PY) -m pip install -q -e . || exit 1; \
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (rebeca kit)" >/dev/null || exit 1; \
	mkdir -p $(dir $(STAMP)) && touch $(STAMP); \
	echo "== install done in $$((SECONDS - s)) s"

# Lab saves outputs into the notebook it runs: the nbstripout git filter (.gitattributes) strips them from what git
# compares and commits, so `git status` stays clean. Set up in this clone's .git/config; skipped outside git.
NBSTRIPOUT = "$(abspath $(PY))" -m nbstripout --keep-id --extra-keys "$(NBSTRIP_KEYS)"
NBSTRIP_KEYS = metadata.widgets metadata.papermill cell.metadata.papermill cell.metadata.execution \
	$(addprefix metadata.language_info.,codemirror_mode file_extension mimetype nbconvert_exporter pygments_lexer version)

install: $(STAMP) git-filter

git-filter:
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean '$(NBSTRIPOUT)' && git config filter.nbstripout.smudge cat && \
	  git config diff.ipynb.textconv '$(NBSTRIPOUT) -t'; fi

demo: install
	@s=$$SECONDS; $(RUN) --profile demo --only 01 && echo "== demo done in $$((SECONDS - s)) s"

# The tests share one smoke world (tests/conftest.py points at the same folder): trained first, with every core,
# then two pytest workers, one file each at a time (the notebook chain stays on one worker)
TEST_WORLD ?= $(CURDIR)/.pytest_cache/smoke_world
TEST_WORKERS ?= 2
TEST_ENV = HF_HUB_OFFLINE=1 REBECA_SMOKE_WORLD=$(TEST_WORLD)
PYTEST = $(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install
	@s=$$SECONDS; $(TEST_ENV) $(PY) -m rebeca_utils.world || exit 1; t=$$SECONDS; \
	$(PYTEST) --durations=15; rc=$$?; \
	echo "== tests done in $$((SECONDS - t)) s, $$((SECONDS - s)) s with the smoke world"; exit $$rc

test-fast: install
	@s=$$SECONDS; $(TEST_ENV) $(PY) -m rebeca_utils.world || exit 1; t=$$SECONDS; \
	$(PYTEST) -m "not slow" --durations=10; rc=$$?; \
	echo "== fast tests done in $$((SECONDS - t)) s, $$((SECONDS - s)) s with the smoke world"; exit $$rc

smoke: install
	$(RUN) --profile smoke

paper: install
	$(RUN) --profile paper

# every figure and table from the outputs that exist (notebook 11; no training, no decoding): make report PROFILE=paper
PROFILE ?= smoke
report: install
	@$(RUN) --profile $(PROFILE) --only 11 && echo "== report: outputs/$(PROFILE)/11_make_figures/report.html"

# JupyterLab at the repository root, so outputs/ can be browsed beside notebooks/; tests/test_lab.py starts it with
# this same command (`make -s lab-command`). As root in a container: make lab LAB_ARGS="--allow-root --ip=0.0.0.0"
LAB = $(PY) -m jupyter lab --ServerApp.root_dir=.
LAB_ARGS ?=
lab: install
	$(LAB) $(LAB_ARGS)

lab-command:
	@echo '$(LAB)'

# every notebook in the paper profile, offline, on random weights of the paper's architectures in a Hub-layout cache
# (README "On a GPU box"): SIZE=ci (published interfaces, cut depth; < 2 GB) or SIZE=full (~20 GB, every
# architecture at its published size); WORK=DIR keeps the cache and outputs there (default: a temp folder)
SIZE ?= ci
WORK ?=
rehearse: install
	@s=$$SECONDS; HF_HUB_OFFLINE=1 $(PY) -m rebeca_utils.rehearse --size $(SIZE) $(if $(WORK),--work $(WORK)) $(if $(PX),--px $(PX)) && \
	echo "== rehearsal ($(SIZE)) done in $$((SECONDS - s)) s"

# then every stage of `make paper` through the paper-profile builders, priced on 1 and GPUS GPUs (a CPU: the ci shape)
GPUS ?= 1
bench: install
	HF_HUB_OFFLINE=1 $(PY) -m rebeca_utils.bench
	HF_HUB_OFFLINE=1 $(PY) -m rebeca_utils.bench --paper-stages --gpus $(GPUS)

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
