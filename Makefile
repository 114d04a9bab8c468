# Two commands for a newcomer: `make demo` and `make test` (README.md).
# Both create the virtual environment and install the project first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STATE  := $(CURDIR)/.mmctr
# CPU build by default; a GPU user passes a CUDA build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO_SIZE  ?= small
# Each demo size keeps its own data, stand-in CLIP and outputs (small: the names without a suffix).
SUFFIX     := $(if $(filter small,$(DEMO_SIZE)),,-$(DEMO_SIZE))
# full-size data trains at the production batch size; the small demo needs smaller batches
DEMO_CONFIG ?= mmctr_assets/deploy/$(if $(filter full,$(DEMO_SIZE)),full,demo)_run_config.yaml

export DAGSTER_HOME    ?= $(STATE)/dagster_home
export MMCTR_STATE_DIR ?= $(STATE)
export MMCTR_DATA_DIR  ?= $(STATE)/demo_data$(SUFFIX)
export MMCTR_OUTPUT_DIR ?= $(STATE)/outputs$(SUFFIX)
# The demo has no internet: it encodes with a small CLIP built and fitted locally.
TINY_CLIP  := $(STATE)/models/tiny-clip$(SUFFIX)
export MMCTR_CLIP_MODEL ?= $(TINY_CLIP)
SHARDS := $(shell echo $${MMCTR_CLIP_SHARDS:-4})

.PHONY: install demo-inputs demo demo-full dev browser test mlflow-ui clean-outputs

install: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(DAGSTER_HOME)/dagster.yaml: mmctr_assets/deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

$(MMCTR_DATA_DIR)/MicroLens_1M_x1/train.parquet: | $(VENV)/.installed
	$(BIN)/mmctr-demo-data --out $(MMCTR_DATA_DIR) --size $(DEMO_SIZE)

# Fitted on the demo covers/titles (seconds), so the demo's content embeddings carry topics.
$(TINY_CLIP)/config.json: | $(VENV)/.installed $(MMCTR_DATA_DIR)/MicroLens_1M_x1/train.parquet
	$(BIN)/mmctr-tiny-clip $(TINY_CLIP) --fit-on $(MMCTR_DATA_DIR)

demo-inputs: install $(MMCTR_DATA_DIR)/MicroLens_1M_x1/train.parquet $(TINY_CLIP)/config.json

## Materialise the whole graph on the demo data: the documented cold-start command.
demo: demo-inputs
	$(BIN)/dagster asset materialize -m mmctr_assets --select '*' --partition-range 0...$$(($(SHARDS)-1)) \
		--config $(DEMO_CONFIG)
	@echo "Outputs in $(MMCTR_OUTPUT_DIR); open the UI with 'make dev'."

## The whole graph at full size (91,717 items, 3.6M training rows, 10 epochs), its own data/outputs.
demo-full:
	$(MAKE) demo DEMO_SIZE=full

## The UI (webserver + daemon) on http://127.0.0.1:3000 with the same instance and data.
dev: install
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STATE)/mlflow.db --port 5000

## The UI tests drive the asset graph in Debian's Chromium (Playwright's own browser download is
## not used); installing it needs root, as in CI.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: install browser
	$(BIN)/pytest -q

clean-outputs:
	rm -rf $(MMCTR_OUTPUT_DIR) $(DAGSTER_HOME)
