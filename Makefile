# The two commands a newcomer needs: `make demo` and `make test`. Each does all of its own set-up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test serve docs

demo: $(INSTALLED) $(FASHION_MNIST)
	$(VENV)/bin/lejepa-pipeline demo

test: $(INSTALLED) $(FASHION_MNIST)
	bash infra/install-test-deps.sh
	$(PY) -m pytest -q -ra --durations=25

# An extra, not a set-up command: a local Prefect server + UI on 127.0.0.1:4200, the work pool, the
# deployments and a worker, so the pipeline can be run from the UI.
serve: $(INSTALLED) $(FASHION_MNIST)
	bash infra/serve.sh

# Regenerate the pages written from the code (tests/test_config.py fails while they are stale).
docs: $(INSTALLED)
	$(PY) -m lejepa.config_reference > docs/configuration.md

# The virtual environment. torch is pinned first: a bare `torch` would pull a multi-GB CUDA build.
$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST ships as a Debian package; install it when we are root, otherwise say how.
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "error: Fashion-MNIST is missing at $(FASHION_MNIST): run 'sudo apt-get install dataset-fashion-mnist'" >&2; \
		exit 1; \
	fi
