# Two commands set up everything on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint typecheck pytest bench clean debs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(STAMP)

## Run the main job: the 3-site federation demo on loopback.
demo: $(STAMP)
	$(BIN)/p2pacs demo

## Install test dependencies (Python extras; Debian's dcmtk, orthanc, faketime, and rsync and
## openssh-server for the benchmarks' baseline; prometheus, chromium and chromium-driver for the
## web tests) and run lint, types and tests.
test: $(TEST_STAMP) debs lint typecheck pytest

debs:
	@missing=""; \
	[ -x /usr/bin/storescu ] || missing="$$missing dcmtk"; \
	[ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	[ -x /usr/bin/faketime ] || missing="$$missing faketime"; \
	[ -x /usr/bin/rsync ] || missing="$$missing rsync"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	[ -x /usr/bin/prometheus ] || missing="$$missing prometheus"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	[ -x /usr/bin/npm ] || missing="$$missing npm"; \
	[ -x /usr/sbin/rsyslogd ] || missing="$$missing rsyslog"; \
	dpkg -s rsyslog-openssl >/dev/null 2>&1 || missing="$$missing rsyslog-openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

pytest: $(TEST_STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/ingest_store.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
