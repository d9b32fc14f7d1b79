# One Makefile for humans and CI. `make test` and `make serve` bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every install comes from the hashed locks in requirements/ (`make lock` compiles them from
# pyproject.toml): exact versions, --no-deps, so nothing resolves on the day of the install. The
# locks name PyTorch's CPU build (torch==...+cpu), which pip finds under TORCH_FIND_LINKS: the
# find-links pip is configured with where there is one, else PyTorch's own CPU wheels.
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null || echo https://download.pytorch.org/whl/cpu/torch/)
PIP_LOCKED = $(PY) -m pip install -q --require-hashes --no-deps
# The project itself, editable, built with the locked setuptools (no isolated build environment to download).
PIP_PROJECT = $(PY) -m pip install -q --no-deps --no-build-isolation -e .
# make lock UPGRADE=1 moves every pin to the newest release pyproject.toml allows; plain make lock
# keeps the pins it can and only resolves what pyproject.toml changed.
UPGRADE ?=
LOCK = $(VENV)/bin/uv pip compile --quiet --universal --generate-hashes --custom-compile-command 'make lock' \
	$(if $(UPGRADE),--upgrade) pyproject.toml requirements/build.in
HOST ?= 127.0.0.1
PORT ?= 8000

SERVE_STAMP := $(VENV)/.serve-installed
ALL_STAMP := $(VENV)/.all-installed
# onnxruntime-web's WebAssembly build, served by the app so the playground can run models in the
# browser. npm is needed only here, at setup: `npm ci` installs exactly what requirements/web's
# package-lock.json names (integrity hashes included), and the files land in a git-ignored folder of
# the service package, which the Dockerfile copies with the rest of service/.
ORT_WEB := service/api/playground/static/ort
ORT_WEB_STAMP := $(ORT_WEB)/VERSION
WEB_LOCK := requirements/web/package.json requirements/web/package-lock.json
ORT_WEB_FILES := ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm

# The delivery settings the performance page compares (Python's own GIL switch interval, then ours).
DELIVERY_SETTINGS := CHARSTREAM_SWITCH_INTERVAL_US=5000,CHARSTREAM_STREAM_INTERVAL=1 \
	CHARSTREAM_SWITCH_INTERVAL_US=500,CHARSTREAM_STREAM_INTERVAL=1 CHARSTREAM_STREAM_INTERVAL=1 default

# make bench-compare BASE=<rev>: that revision's server beside today's code, 64 streams in the same
# interleaved rounds (benchmarks/delivery.py), with the same settings on both sides.
BASE ?=
COMPARE_VARIANT ?= fp32
COMPARE_SETTINGS ?= default
COMPARE_ROUNDS ?= 5

.PHONY: lock serve test lint typecheck unit docs bench bench-compare container-test clean web test-servers

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): requirements/serve.txt pyproject.toml | $(VENV)/bin/python
	$(PIP_LOCKED) -r requirements/serve.txt
	$(PIP_PROJECT)
	$(PY) -m pip check
	touch $@

$(ALL_STAMP): requirements/dev.txt pyproject.toml | $(VENV)/bin/python
	$(PIP_LOCKED) --find-links $(TORCH_FIND_LINKS) -r requirements/dev.txt
	$(PIP_PROJECT)
	$(PY) -m pip check
	touch $@ $(SERVE_STAMP)

# The test environment (dev) is resolved first; the serving image's and the training image's locks
# are constrained to its versions, so the tests run what the images ship.
lock: $(ALL_STAMP)
	$(LOCK) requirements/torch-cpu.in --extra train --extra serve --extra dev \
		--find-links $(TORCH_FIND_LINKS) -o requirements/dev.txt
	$(LOCK) --extra serve -c requirements/dev.txt -o requirements/serve.txt
	$(LOCK) requirements/torch-cpu.in --extra train --find-links $(TORCH_FIND_LINKS) \
		-c requirements/dev.txt -o requirements/train.txt

$(ORT_WEB_STAMP): $(WEB_LOCK)
	@command -v npm > /dev/null || { echo "make web: npm is needed to install onnxruntime-web (apt-get install -y npm)"; exit 1; }
	rm -rf build/ort-web && mkdir -p build/ort-web $(ORT_WEB)
	cp $(WEB_LOCK) build/ort-web/
	npm ci --prefix build/ort-web --no-audit --no-fund --loglevel=error
	cd build/ort-web/node_modules/onnxruntime-web && cp $(addprefix dist/,$(ORT_WEB_FILES)) README.md $(CURDIR)/$(ORT_WEB)/
	node -p "require('./build/ort-web/node_modules/onnxruntime-web/package.json').version" > $@

web: $(ORT_WEB_STAMP)

serve: $(SERVE_STAMP)
	@$(MAKE) --no-print-directory web || echo "charstream: onnxruntime-web is not installed; the playground runs models on the server only"
	@echo "charstream: serving exports/ on http://$(HOST):$(PORT)  (docs: http://$(HOST):$(PORT)/docs)"
	@echo "try:  curl -s http://$(HOST):$(PORT)/v1/generate -H 'content-type: application/json' -d '{\"prompt\": \"ROMEO:\", \"max_new_chars\": 200, \"seed\": 1}'"
	@echo "      curl -sN http://$(HOST):$(PORT)/v1/generate -H 'content-type: application/json' -d '{\"prompt\": \"ROMEO:\", \"max_new_chars\": 200, \"stream\": true}'"
	$(VENV)/bin/charstream serve --host $(HOST) --port $(PORT)

lint: $(ALL_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(ALL_STAMP)
	$(VENV)/bin/mypy training service exports interpret benchmarks charstream_cli.py

# The real servers the tests start (redis-server, nginx), from Debian's packages when missing:
# installed when root, otherwise named so they can be installed by hand.
TEST_SERVERS := redis-server:redis-server nginx:nginx-light
test-servers:
	@missing=""; for pair in $(TEST_SERVERS); do \
	  command -v $${pair%%:*} > /dev/null || [ -x /usr/sbin/$${pair%%:*} ] || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    echo "make: installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "make: the tests need$$missing (apt-get install -y$$missing)"; exit 1; fi; \
	fi

unit: $(ALL_STAMP) $(ORT_WEB_STAMP) test-servers
	$(VENV)/bin/pytest --require-all-parts

# The documentation site; --strict fails on a broken link or anchor and on a page left out of the nav.
docs: $(ALL_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

test: test-servers lint typecheck unit docs

# The server's two event loops, with frames of 1 and of 2 (the default), side by side.
LOOP_SETTINGS := CHARSTREAM_EVENT_LOOP=uvloop,CHARSTREAM_STREAM_INTERVAL=1 CHARSTREAM_STREAM_INTERVAL=1 \
	CHARSTREAM_EVENT_LOOP=uvloop default

bench: $(ALL_STAMP) test-servers $(ORT_WEB_STAMP)
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) -m benchmarks.train_speed
	$(PY) -m benchmarks.validation_cost
	$(PY) -m benchmarks.finetune
	$(PY) -m benchmarks.cells
	$(PY) -m benchmarks.export_speed
	$(PY) -m benchmarks.serving
	CHARSTREAM_STREAM_INTERVAL=4 $(PY) -m benchmarks.serving --variant int8 --name serving-int8 --streams 1,8,64
	$(PY) -m benchmarks.delivery --variant fp32 --name delivery-fp32 $(DELIVERY_SETTINGS)
	$(PY) -m benchmarks.delivery --variant int8 --name delivery-int8 $(DELIVERY_SETTINGS) \
		CHARSTREAM_STREAM_INTERVAL=4
	$(PY) -m benchmarks.delivery --variant fp32 --rounds 5 --chars 1000 --client-nice 10 --name delivery-loop-fp32-nice10 \
		$(LOOP_SETTINGS)
	$(PY) -m benchmarks.delivery --variant int8 --rounds 7 --chars 2000 --client-nice 10 --name delivery-loop-int8-nice10 \
		$(LOOP_SETTINGS) CHARSTREAM_EVENT_LOOP=uvloop,CHARSTREAM_STREAM_INTERVAL=4 CHARSTREAM_STREAM_INTERVAL=4
	$(PY) -m benchmarks.delivery --variant fp32 --rounds 5 --chars 1000 --name delivery-loop-fp32-nice0 \
		CHARSTREAM_EVENT_LOOP=uvloop default
	$(PY) -m benchmarks.delivery --variant int8 --rounds 5 --chars 2000 --name delivery-loop-int8-nice0 \
		CHARSTREAM_EVENT_LOOP=uvloop default
	for streams in 1 8; do \
		$(PY) -m benchmarks.delivery --variant fp32 --streams $$streams --rounds 5 --chars 1000 --client-nice 10 \
			--name delivery-loop-fp32-streams$$streams CHARSTREAM_EVENT_LOOP=uvloop default || exit 1; \
	done
	$(PY) -m benchmarks.peers_bench
	$(PY) -m benchmarks.prefill_fairness
	$(PY) -m benchmarks.sessions
	$(PY) -m benchmarks.load
	$(PY) -m benchmarks.openai_compat
	$(PY) -m benchmarks.activations_cost
	$(PY) -m benchmarks.constrain_score
	$(PY) -m benchmarks.constraint_table
	$(PY) -m benchmarks.steer_cells
	$(PY) -m benchmarks.generate
	$(PY) -m benchmarks.prompt_cache
	$(PY) -m benchmarks.failover
	$(PY) -m benchmarks.fuzz
	$(PY) -m benchmarks.abuse
	$(PY) -m benchmarks.states
	$(PY) -m benchmarks.browser

# Another revision (a commit, tag or branch) checked out in a temporary git worktree and served beside
# today's code; results in benchmarks/results/delivery-compare-$(COMPARE_VARIANT).json. The worktree
# is removed afterwards, also when the run fails or is interrupted.
bench-compare: $(ALL_STAMP)
	@test -n "$(BASE)" || { echo "make bench-compare: name the revision to compare, e.g. make bench-compare BASE=HEAD~1"; exit 2; }
	@base=$$(mktemp -d "$${TMPDIR:-/tmp}/charstream-base.XXXXXX") || exit 2; \
	if ! git worktree add --detach --quiet "$$base" "$(BASE)"; then rmdir "$$base"; exit 2; fi; \
	trap 'git worktree remove --force "$$base"' EXIT; trap 'exit 130' INT TERM; \
	if [ "$(COMPARE_SETTINGS)" = default ]; then before="checkout=$$base"; else before="checkout=$$base,$(COMPARE_SETTINGS)"; fi; \
	echo "make bench-compare: $(BASE) ($$(git -C "$$base" rev-parse --short HEAD)) in $$base beside this checkout"; \
	$(PY) -m benchmarks.delivery --variant $(COMPARE_VARIANT) --rounds $(COMPARE_ROUNDS) \
		--name delivery-compare-$(COMPARE_VARIANT) "$$before" $(COMPARE_SETTINGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache $(ORT_WEB)
