# The two commands of the README's quick start are `make demo` and `make test`; each sets
# everything up first (Debian packages, virtualenv, package).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test test-full lint bench clean

setup:
	@tools/setup.sh

demo: setup
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" examples/demo.sh

# pytest exits 5 when it collects no tests: that is a failure here, as any non-zero status is.
test: setup
	$(PY) -m pytest -q -ra

test-full: setup
	VELO_TEST_FULL=1 VELO_WRITE_DOCS=1 $(PY) -m pytest -q -ra -m ""

lint: setup
	$(PY) -m ruff check veloverlay tests bench
	$(PY) -m ruff format --check veloverlay tests bench
	$(PY) -m mypy

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/results

# The VM matrix and the power-cut test under qemu (tools/matrix/, vagrant/): as root, slow
# (tens of minutes), never part of .ci/run. They write docs/matrix.md and the powercut section
# of docs/reliability.md. Images and kernels are cached in $VELO_MATRIX_CACHE
# (default /var/cache/veloverlay-matrix).
matrix:
	/usr/bin/python3 tools/matrix/matrix.py

powercut:
	/usr/bin/python3 tools/matrix/powercut.py
