# One-command set-up: `make init`, then `make test` / `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.init-stamp
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))

# torch: the CPU wheel shipped on this machine's disk when there is one, else the
# normal package from the index (CUDA builds for GPU users). Override with TORCH=...
LOCAL_TORCH := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH ?= $(if $(LOCAL_TORCH),$(LOCAL_TORCH),torch>=2.2)

.PHONY: init test demo bench lint clean help gpu-check notebook

help:
	@echo "make init   create .venv and install torch, music-interpret[dev,dask,demo] and plugins/*"
	@echo "make test   run the test suite (runs init first when needed)"
	@echo "make demo   python -m music_interpret run pipeline.yaml on the bundled demo"
	@echo "make bench  run the benchmarks in bench/ (results in bench/results/)"
	@echo "make lint   ruff check"
	@echo "make notebook  install the [notebook] extra (JupyterLab) and open notebooks/feature_exploration.ipynb"
	@echo "make gpu-check  on a CUDA machine without network: tests, demo and GPU benchmarks (bench/gpu_check.sh)"

init: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,dask,demo]"
	$(foreach d,$(PLUGIN_DIRS),$(BIN)/python -m pip install --quiet --disable-pip-version-check -e "$(d)" &&) true
	@# headless Chromium for the HTML report's browser test (Debian package; skipped elsewhere)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	      || echo "note: could not install chromium; the report browser test will be skipped"; \
	  else echo "note: chromium not found; the report browser test will be skipped"; fi; }
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m music_interpret run pipeline.yaml

bench: $(STAMP)
	$(BIN)/python -m bench

gpu-check:
	bash bench/gpu_check.sh

notebook: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[notebook]"
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/feature_exploration.ipynb

lint: $(STAMP)
	$(BIN)/ruff check music_interpret tests bench plugins

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
