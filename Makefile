# DRMGuard Service. `make demo` and `make test` are all a new user needs; both create .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch (on this machine's disk as a wheel); installed first so that the
# package's own range (torch>=2.4,<2.15) is already satisfied and pip pulls no CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` (tests/conftest.py: heavy modules first, whole files to a worker; 0 = one process)
TEST_WORKERS ?= 2

.PHONY: venv test test-fast demo bench bench-zoo bench-scan bench-predict paper-tables paper-tables-quick proto proto-check prometheus lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml clients/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(TORCH_PIN)
	$(PIP) install -q -c constraints.txt -e ./clients -e '.[dev]'
	touch $(STAMP)

# The Prometheus tests need Debian's prometheus package (prometheus + promtool).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package (needed by tests/ops)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	  || echo "could not install Debian's 'prometheus' package: tests/ops will fail until it is installed"; }

test: venv prometheus
	$(PY) -m pytest -q --timeout=600 --durations=12 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: venv
	$(PY) -m pytest -q -x --timeout=300 tests -m "not integration"

demo: venv
	$(PY) -m guard_server.demo

bench: bench-zoo

bench-zoo: venv
	$(PY) benchmarks/zoo.py --out .bench/zoo

bench-scan: venv
	$(PY) benchmarks/scan_tables.py --zoo .bench/zoo --out docs/results

bench-predict: venv
	$(PY) benchmarks/predict.py

# The zoo the paper's tables are measured on (models already built are reused), then the tables (cached by content).
ZOO_ATTACKS = badnets blend sig input_aware clean_label wanet badnets_small wanet_multi adaptive blend_subtle
paper-tables: venv
	$(PY) benchmarks/zoo.py --out .bench/zoo --benign-count 6 --attacks $(ZOO_ATTACKS)
	$(PY) benchmarks/zoo.py --out .bench/zoo-arch --tasks gaze --archs mobilenetv1 --widths 0.5 --benign-count 2 --attacks badnets wanet
	$(PY) benchmarks/zoo.py --out .bench/zoo-arch --tasks gaze --archs resnet34 --widths 0.25 --benign-count 1 --attacks badnets
	$(PY) benchmarks/paper_tables.py --out docs/results --baseline-steps 100 --ablation-models 1 --ablation-tasks gaze --paper-tasks gaze

paper-tables-quick: venv
	$(PY) benchmarks/paper_tables.py --quick --out .bench/paper-tables-quick

proto: venv
	$(PY) -m grpc_tools.protoc -Iguard_api=proto --python_out=clients --grpc_python_out=clients --pyi_out=clients proto/drmguard/v1/guard.proto
	touch clients/guard_api/__init__.py clients/guard_api/drmguard/__init__.py clients/guard_api/drmguard/v1/__init__.py

proto-check: proto
	git diff --exit-code clients/guard_api/

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
