# MiniCPM Edge. The two commands of the README: `make demo` and `make test`; both set up .venv first.
PYTHON     ?= python3
VENV       ?= .venv
# On these machines torch must be asked for exactly like this (a CPU build on local disk); elsewhere
# override it, e.g. TORCH_SPEC="torch==2.5.1" or TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= export,kernels,onnxruntime,test
PY         := $(VENV)/bin/python
CPM        := $(VENV)/bin/cpm-edge
BUILD      ?= build
TARGETS    ?= sm_87,sm_89,sm_90
SETUP_STAMP := $(VENV)/.setup-$(shell echo "$(TORCH_SPEC) $(EXTRAS)" | cksum | cut -d' ' -f1)

.PHONY: setup test demo kernels bench-kernels clean help

help:
	@echo "make demo    tiny MiniCPM4 model -> streamed answer (CPU, no downloads of models)"
	@echo "make test    the test suite (what CI runs)"
	@echo "make setup   create $(VENV) with the kit and its test dependencies"
	@echo "make kernels compile the Triton kernels for TARGETS=$(TARGETS) into $(BUILD)/kernels (no GPU needed)"
	@echo "make bench-kernels   sparse-attention / ternary savings (counted; timed on an NVIDIA GPU)"

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.setup-*
	@touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(CPM) tiny $(BUILD)/demo/tiny-dense --force
	$(CPM) generate $(BUILD)/demo/tiny-dense --chat --prompt "Which block should the robot pick up?" \
		--max-tokens 48 --temperature 0.8 --top-p 0.9 --seed 7

kernels: setup
	$(CPM) kernels compile --target $(TARGETS) --out $(BUILD)/kernels

bench-kernels: setup
	$(PY) -m pip install -q matplotlib
	$(PY) bench/kernels.py

clean:
	rm -rf $(BUILD) .pytest_cache
