# ComfyUI-Troupe developer commands. `make demo` and `make test` build the host when missing.
SHELL := /bin/bash
PY := .host/venv/bin/python
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: host demo serve test test-unit clean-host

host:
	@bash scripts/host.sh

demo: host
	$(PY) scripts/demo.py

serve: host
	cd .host/ComfyUI && ../venv/bin/python main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-api-nodes

test: host
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: host
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean-host:
	rm -rf .host
