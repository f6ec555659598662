# Two entry points: `make demo` (generate a pruned video on the demo pipeline) and `make test`.
# Both create .venv on first use. torch is pinned to the CPU build these machines carry;
# on a GPU machine install torch yourself first and `pip install -e .` picks it up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/vidprune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test
install: $(BIN)/vidprune

demo: install
	$(BIN)/vidprune generate "a red circle moves left over a blue checkered floor, the camera is still" \
		--method tape --keep 0.5 -o out/demo.mp4 --overwrite

test: install
	$(BIN)/python -m pytest
