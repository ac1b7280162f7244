# Two commands do all the set-up: `make demo` and `make test` each build the
# virtual environment from the requirements on first use (`make test-fast`
# too).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo serve test test-fast browser clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-eval.txt requirements-ui.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-eval.txt
	$(PY) -m pip install --quiet --no-deps -e .   # import segldm_jax from anywhere
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py --config configs/seg_f4.py:demo --workdir $(WORKDIR)
	$(PY) sample.py --workdir $(WORKDIR)
	$(PY) evaluate.py --workdir $(WORKDIR) --num_images 64

serve: $(VENV)/.installed
	$(PY) serve.py --workdir $(WORKDIR)

# The web page's test drives Debian's Chromium through its chromedriver:
# installed on first use (about 40 s), never downloaded by a test tool.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=10 tests

# The inner loop: every test but the slow ones (tests/conftest.py marks
# those: any process started (train.py, sample.py, serve.py, the browser,
# `python -c`, data loader workers) or end-to-end training; it fails an
# unmarked test that starts one). No browser needed. Compiled programs are
# kept in TEST_XLA_CACHE between runs, so a rerun compiles only what an
# edit changed. `make test` (CI) still runs everything, from a cold cache.
TEST_XLA_CACHE ?= $(VENV)/test-xla-cache
test-fast: $(VENV)/.installed
	SEGLDM_TEST_XLA_CACHE=$(abspath $(TEST_XLA_CACHE)) \
	  $(PY) -m pytest -q -n 2 --dist loadfile --durations=10 -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
