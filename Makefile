# The two commands a new user needs: `make demo` (the main job on the sandbox) and `make test`.
.PHONY: setup test test-faults test-real test-scale test-all lint demo demo-real up up-real down bench clean

export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/.venv/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/pytest -q -m "not faults and not real"

# Real faults (stopped registry, restarted dockerd, killed processes): slower, so a separate target.
test-faults: setup
	.venv/bin/pytest -q -m "faults and not real"

# The story on a real Kubernetes + Argo CD (built from Go modules on first use: minutes; cached after).
test-real: setup
	bash scripts/setup-real.sh
	.venv/bin/pytest -q -m real tests/real

# Scale-out (PostgreSQL, two workers, ten deploys at once): minutes, not part of `make test`.
test-scale: setup
	.venv/bin/pytest -q -s -m scale tests/scale

test-all: test test-faults

lint: setup
	.venv/bin/ruff check .

demo: setup
	.venv/bin/python -m sandbox.demo

# The same story on the real tier (a one-node Kubernetes and Argo CD built from Go modules).
demo-real: setup
	bash scripts/setup-real.sh
	.venv/bin/python -m sandbox.demo --real

up: setup
	.venv/bin/delivery up

up-real: setup
	bash scripts/setup-real.sh
	.venv/bin/delivery up --real

down:
	.venv/bin/delivery down

bench: setup
	.venv/bin/python bench/run_all.py

clean:
	.venv/bin/delivery sandbox reset || true
	rm -rf .tools
