# rtmdet-serve: every command a developer or CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: proto install triton-env test test-all lint fmt serve detect bench gpu-check device-kit clean fuzz soak

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Triton Inference Server for the Triton backend's tests: PyPI's nvidia-pytriton bundles tritonserver 2.51
# and its Python backend; it needs numpy<2, hence a venv of its own. The Python-backend stub for this
# Python goes where the server looks for it (pytriton does this copy at run time; we run the server bare).
TRITON_VENV ?= .venv-triton
TRITON_DIST := $(TRITON_VENV)/lib/python3.11/site-packages/pytriton/tritonserver
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "nvidia-pytriton==0.7.0" "numpy==1.26.4" "onnxruntime==1.32.0"
	cp $(TRITON_DIST)/python_backend_stubs/3.11/triton_python_backend_stub $(TRITON_DIST)/backends/python/
	touch $@

triton-env: $(TRITON_VENV)/.installed

test: install triton-env
	$(PY) -m pytest -q -m "not slow" --durations=30

test-all: install triton-env
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

fmt: install
	$(VENV)/bin/ruff check --fix .

serve: install
	$(VENV)/bin/rtmdet serve

detect: install
	$(VENV)/bin/rtmdet detect examples/shapes.jpg

# CPU inference: this project's runners beside ONNX Runtime, OpenVINO and MMDetection (one table), then
# training steps beside MMDetection's.
bench: install
	$(PY) bench/bench_runners.py
	$(PY) bench/bench_low_precision.py --size tiny --img-size 640 --batches 1 8 --threads 1
	$(PY) bench/bench_canvas.py --sizes tiny --threads 2 --shapes 4:3 16:9
	$(PY) bench/bench_winograd.py --sizes tiny
	$(PY) bench/bench_allocator.py
	$(PY) bench/bench_vs_mmdet.py --no-infer

# Every CUDA path checked against its CPU/eager twin, timed, served; exits 2 without CUDA.
gpu-check: install
	$(PY) bench/gpu_check.py

# Wheels for running gpu-check on a GPU machine without network (README, GPU path): `bash tools/device_gpu_check.sh`
# there, with .whl/ carried.
device-kit:
	$(PYTHON) tools/device_kit.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

proto: install
	$(PY) -m service.proto_build

# Reliability (RELIABILITY.md): coverage-guided fuzzing of the image decoder (new corpus entries are merged into
# tests/data/fuzz_corpus, replayed by the tests), and the 10-minute soak of both protocols at once.
FUZZ_SECONDS ?= 120
SOAK_SECONDS ?= 600

fuzz: install
	$(PY) bench/fuzz_decode.py --seconds $(FUZZ_SECONDS)

soak: install
	$(PY) bench/soak.py soak --duration-s $(SOAK_SECONDS) --out /tmp/rtmdet-soak-report.json
	$(PY) bench/soak.py overload --duration-s 60 --http-clients 24 --grpc-clients 24 --max-batch-size 2 \
		--max-queue-size 4 --out /tmp/rtmdet-overload-report.json
