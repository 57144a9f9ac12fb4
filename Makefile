# ComfyUI-Troupe developer commands. `make demo` and `make test` build the host when missing.
# COMFYUI=/path/to/ComfyUI runs any of them on a copy of that ComfyUI tree instead of the default 0.3.75.
SHELL := /bin/bash
COMFYUI ?=
export COMFYUI
export TROUPE_HOST := $(shell COMFYUI="$(COMFYUI)" bash scripts/host.sh --dir)
PY := $(TROUPE_HOST)/venv/bin/python
PORT ?= 8188
PYTEST_ARGS ?=
QUICK ?=
PEERS ?=

.PHONY: host demo serve lint test test-unit bench clean-host

host:
	@bash scripts/host.sh

demo: host
	$(PY) scripts/demo.py

serve: host
	cd $(TROUPE_HOST)/ComfyUI && ../venv/bin/python main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-api-nodes

lint: host
	$(PY) -m ruff check .

test: host lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: host
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Every benchmark the README quotes, one markdown table per family in bench-results/ (QUICK=1: a few minutes).
# Peers from checkouts outside the repository: PEERS="--peer-ipadapter-plus DIR --peer-instantx DIR --peer-xflux DIR".
bench: host
	$(PY) scripts/bench_all.py $(if $(QUICK),--quick) $(PEERS)

clean-host:
	rm -rf $(TROUPE_HOST)
