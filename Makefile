# One entry point for people, CI and the README. Every target uses the project venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PROTO_SRC := protos/inferpool/v1
PROTO_OUT := inferpool/v1

.PHONY: help venv servers proto proto-check lint typecheck docs docs-check test demo up flower bench bench-all train export clean

help:
	@echo "make demo        start the stack on loopback, classify held-out digits, print figures, stop"
	@echo "make test        lint, type-check, proto and docs drift checks and the test suite (real servers)"
	@echo "make up          run redis, memcached, a worker, the API and Flower in the foreground (Ctrl-C stops)"
	@echo "make mutation    the curated mutations (tests/mutations.toml): each must fail its named tests"
	@echo "make flower      Flower on 127.0.0.1:5555 for a running broker (FLOWER_BASIC_AUTH=user:password)"
	@echo "make bench       bounded load test of the miss and hit paths (writes bench/results/*.json)"
	@echo "make bench-all   the harness: inferpool against its baselines (~10 min; BENCH_ARGS=--quick ~2)"
	@echo "make proto       regenerate inferpool/v1/ and inferpool/triton/ *_pb2*.py from protos/"
	@echo "make train       retrain models/digits/1 (seeded) and export it (make export)"
	@echo "make export      write models/digits_export (torch.export) and models/digits_onnx from digits' weights"
	@echo "make docs        regenerate docs/configuration.md and the metrics table in docs/operations.md"
	@echo "make docs-check  fail when those drifted from the code (part of make test)"

# The venv is rebuilt when the dependency spec changes. torch is pinned through
# constraints.txt to the CPU wheel; CUDA users install their own torch first.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

servers:
	@scripts/ensure-servers.sh

# Absolute imports (inferpool.v1.x_pb2) come from generating with protos/ as the include root.
proto: venv
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. $(PROTO_SRC)/tensor.proto $(PROTO_SRC)/envelope.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)/inference.proto $(PROTO_SRC)/jobs.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/inferpool/triton/model_config.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/inferpool/triton/grpc_service.proto

proto-check: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_boundaries.py::test_generated_code_matches_proto

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# docs/configuration.md and the metrics table in docs/operations.md come from the code
# (settings' metadata, the Prometheus metric objects): regenerate, or check for drift.
docs: venv
	$(PY) -m scripts.gen_docs

docs-check: venv
	$(PY) -m scripts.gen_docs --check

test: venv servers lint typecheck docs-check
	$(PY) -m pytest

# Each curated mutation applied to a copy of the tree, its named tests run against real
# servers; fails if one survives or its snippet no longer matches. MUTATION_ARGS=--check
# only verifies snippets and test ids; --only ID,ID runs a few.
.PHONY: mutation
mutation: venv servers
	$(PY) scripts/mutation.py $(MUTATION_ARGS)

demo: venv servers
	$(PY) -m bench.demo

up: venv servers
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/honcho start -f Procfile

# Flower alone, for a stack started some other way; basic auth is required.
flower: venv
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password" >&2; exit 1; }
	@# Flower's kombu skips certificate checks for a rediss:// URL naming no ssl_cert_reqs.
	@case "$${INFERPOOL_REDIS_URL:-}" in rediss://*ssl_cert_reqs=*|rediss://*ssl_ca_certs=*) ;; \
	  rediss://*) echo "add ?ssl_cert_reqs=required (and ssl_ca_certs=...) to INFERPOOL_REDIS_URL" >&2; exit 1;; esac
	$(VENV)/bin/celery --broker="$${INFERPOOL_REDIS_URL:-redis://127.0.0.1:6379/0}" flower --address=127.0.0.1 --port="$${FLOWER_PORT:-5555}" --read_only --conf=scripts/flowerconfig.py

bench: venv servers
	$(PY) -m bench.load

# Every workload and baseline in one run: JSON under bench/results/harness/.
bench-all: venv servers
	$(PY) -m bench.harness $(BENCH_ARGS)

train: venv
	$(PY) models/train_digits.py
	$(PY) models/export.py

# models/digits_export and models/digits_onnx from models/digits' weights.
export: venv
	$(PY) models/export.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
