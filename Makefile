# MiniCPM Edge. The two commands of the README: `make demo` and `make test`; both set up .venv first.
PYTHON     ?= python3
VENV       ?= .venv
# On these machines torch must be asked for exactly like this (a CPU build on local disk); elsewhere
# override it, e.g. TORCH_SPEC="torch==2.5.1" or TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= export,kernels,onnxruntime,agent,tensorrt-rtx,test
PY         := $(VENV)/bin/python
CPM        := $(VENV)/bin/cpm-edge
BUILD      ?= build
TARGETS    ?= sm_87,sm_89,sm_90
SETUP_STAMP := $(VENV)/.setup-$(shell echo "$(TORCH_SPEC) $(EXTRAS)" | cksum | cut -d' ' -f1)

.PHONY: setup mosquitto systemd curl test demo kernels engine flash test-device bench-kernels bench-agent bench-cpu gpu-check gpu-kernels clean help

help:
	@echo "make demo    tiny MiniCPM4 model -> streamed answer (CPU, no downloads of models)"
	@echo "make test    the test suite (what CI runs)"
	@echo "make setup   create $(VENV) with the kit and its test dependencies"
	@echo "make kernels compile the Triton kernels for TARGETS=$(TARGETS) into $(BUILD)/kernels (no GPU needed)"
	@echo "make bench-kernels   sparse-attention / ternary / int4 savings (counted; timed on an NVIDIA GPU)"
	@echo "make bench-agent     MQTT agent: requests/s and its own overhead on a loopback Mosquitto"
	@echo "make bench-cpu       onnxruntime backend vs llama.cpp, same weights (fp32/F32 and int4/Q4_0): decode tokens/s, peak memory"
	@echo "make gpu-check       on an NVIDIA GPU, <= 8 min: kernels vs references (JIT and AOT $(GPU_TARGET)), timings"

setup: mosquitto systemd curl $(SETUP_STAMP)

# tests/test_flash.py checks the flashed unit with the real `systemd-analyze verify` (Debian's systemd package;
# installing it does not start systemd in a container).
systemd:
	@if command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; \
	else echo "note: systemd-analyze is not installed (sudo apt-get install systemd); the unit check skips"; fi

# tests/test_http_api.py streams one answer with the real curl (Debian's curl package).
curl:
	@if command -v curl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; \
	else echo "note: curl is not installed (sudo apt-get install curl); its HTTP API test skips"; fi

# The agent's tests run a real Mosquitto; as root on Debian/Ubuntu it is installed here, else say how.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	else echo "note: mosquitto is not installed (sudo apt-get install mosquitto mosquitto-clients);" \
		"the agent tests skip and make demo uses the embedded MQTT 3.1.1 broker"; fi

$(SETUP_STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.setup-*
	@touch $@

test: setup
	$(PY) -m pytest -q

# tiny model -> ONNX export -> agent on a loopback broker (Mosquitto, else the embedded one) -> `ask` streams.
demo: setup
	@echo "demo: a tiny MiniCPM4 with random weights, so the answer is gibberish; every step of the path is real"
	$(CPM) tiny $(BUILD)/demo/tiny-dense --force
	$(CPM) export $(BUILD)/demo/tiny-dense --out $(BUILD)/demo/export --max-seq 1024 --force
	$(PY) -m agent.demo --bundle $(BUILD)/demo/export --prompt "Which block should the robot pick up?" \
		--chat --max-tokens 48 --temperature 0.8 --top-p 0.9 --seed 7 --schema-demo

engine: setup
	@test -n "$(DEVICE)" || { echo "make engine: set DEVICE to a profile: $$(ls devices/*/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	$(CPM) engine --device $(DEVICE) $(if $(MODEL),--model $(MODEL)) --out $(BUILD)/engines/$(DEVICE) --force

flash: setup
	@test -n "$(DEVICE)" -a -n "$(HOST)" || { echo "make flash: set DEVICE=<profile> and HOST=user@host or HOST=local:ROOT (ROOT: the device's /)"; exit 2; }
	$(CPM) flash --bundle $(BUILD)/engines/$(DEVICE) --host $(HOST) $(if $(BROKER),--broker $(BROKER)) \
		$(if $(DEVICE_ID),--device-id $(DEVICE_ID)) $(if $(CA_FILE),--ca-file $(CA_FILE)) $(FLASH_FLAGS)

# On the device (no torch there): the flashed agent checks golden answers and speed floors.
CPM_DEVICE ?= /opt/cpm-edge/.venv/bin/cpm-edge
BUNDLE     ?= /opt/cpm-edge/bundle
test-device:
	@mkdir -p $(BUILD)
	$(CPM_DEVICE) device-test --bundle $(BUNDLE) --report $(BUILD)/device-report.json

kernels: setup
	$(CPM) kernels compile --target $(TARGETS) --out $(BUILD)/kernels

bench-kernels: setup
	$(PY) -m pip install -q matplotlib
	$(PY) bench/kernels.py

bench-agent: setup
	$(PY) -m pip install -q matplotlib
	$(PY) bench/agent.py

# llama-cpp-python builds llama.cpp from source (a few minutes the first time); the tests in
# tests/test_gguf.py, test_gguf_q4_0.py and test_minicpm5.py run llama.cpp once it is installed.
bench-cpu: setup
	$(PY) -m pip install -q matplotlib gguf==0.19.0 llama-cpp-python==0.3.36
	$(PY) bench/cpu.py

# On an NVIDIA GPU, at most 8 minutes, with the machine's own python (torch, triton, cuda-python; nothing is
# installed): Triton kernels JIT-compiled vs the torch references, the AOT cubins through the GPU plan executor,
# decode/GEMV timings -> bench/results/gpu-<gpu>.json. The cubins are compiled first, on CPU, by `make kernels`
# into $(BUILD)/gpu-check (not $(BUILD)/kernels, which keeps every target). A GPU machine without the kit's venv
# takes a folder compiled elsewhere: make gpu-check GPU_KERNELS=build/gpu-check/kernels/sm_90
GPU_TARGET  ?= sm_90
GPU_PYTHON  ?= python3
GPU_KERNELS ?=
gpu-check:
	@if [ -z "$(GPU_KERNELS)" ]; then $(MAKE) --no-print-directory gpu-kernels; fi
	timeout 480 $(GPU_PYTHON) bench/gpu_check.py --kernels $(or $(GPU_KERNELS),$(BUILD)/gpu-check/kernels/$(GPU_TARGET)) $(GPU_CHECK_FLAGS)

# A compile that only reports unaccepted register spills (exit 1) still wrote its kernels: check them anyway.
gpu-kernels:
	rm -rf $(BUILD)/gpu-check/kernels
	$(MAKE) --no-print-directory kernels TARGETS=$(GPU_TARGET) BUILD=$(BUILD)/gpu-check || \
		echo "make gpu-check: the kernel compile reported the problem above; checking what it wrote"

clean:
	rm -rf $(BUILD) .pytest_cache
