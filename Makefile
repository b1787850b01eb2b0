# Every routine action of Swarm Core. `make` alone lists them.
# The local stack runs without Docker: scripts/stack.sh (services), scripts/app.sh (the app).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SWARM_STACK ?= dev
export SWARM_STACK

VENV := .venv/bin
APP_ENV = .run/$(SWARM_STACK)/app.env

.PHONY: help install asyncapi-tool services up down status test lint migrate certs compose-check bench bench-short

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  SWARM_STACK=$(SWARM_STACK) (dev or test) picks the stack for services, up, down, status, migrate"

install: ## apt packages (debootstrap, nginx, PostgreSQL, mosquitto clients), the .venv, RabbitMQ 4.0's Debian 13 root, the AsyncAPI checker; a no-op when done
	@scripts/stack.sh install
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory asyncapi-tool; \
	else echo "npm not found: the AsyncAPI checker the tests use is not installed (Debian: nodejs, npm)"; fi

# The official AsyncAPI parser (npm, version pinned in its package.json) that the tests validate the
# device protocol's document with; installed here, never at test time. No lock file, no install scripts.
ASYNCAPI_TOOL := tools/asyncapi-check/node_modules/@asyncapi/parser/package.json
asyncapi-tool: $(ASYNCAPI_TOOL) ## the AsyncAPI checker (tools/asyncapi-check, npm)
$(ASYNCAPI_TOOL): tools/asyncapi-check/package.json
	npm install --prefix tools/asyncapi-check --no-package-lock --ignore-scripts --no-audit --no-fund
	@touch $@

services: ## start PKI, PostgreSQL, RabbitMQ and nginx of the stack (idempotent), write .run/<stack>/app.env
	@scripts/stack.sh services

up: install services migrate ## services + migrations + the app in the background, then where to look
	@scripts/app.sh start
	@scripts/app.sh info

down: ## stop the stack's app, nginx, RabbitMQ (and unmount its chroot) and PostgreSQL (only what the stack started)
	@scripts/stack.sh down

status: ## what runs in the stack
	@scripts/stack.sh status

migrate: ## alembic upgrade head against the stack's database
	@scripts/app.sh migrate

certs: ## the stack's CA, server and client certificates (part of `services`)
	@pki/pki.sh ca .run/$(SWARM_STACK)/pki
	@pki/pki.sh server .run/$(SWARM_STACK)/pki rabbitmq localhost DNS:localhost,IP:127.0.0.1
	@pki/pki.sh server .run/$(SWARM_STACK)/pki nginx localhost DNS:localhost,IP:127.0.0.1
	@pki/pki.sh client .run/$(SWARM_STACK)/pki core swarm-core
	@ls -l .run/$(SWARM_STACK)/pki

# The test stack (own folder, own ports) is fully separate from dev; its settings are exported
# so that nothing in the tests can reach the dev stack by default.
test: asyncapi-tool ## start the test stack and run the tests (PYTEST_ARGS=... to pass options)
	@SWARM_STACK=test scripts/stack.sh services
	@set -a && . .run/test/app.env && set +a && SWARM_STACK=test $(VENV)/pytest $(PYTEST_ARGS)

lint: ## ruff check, ruff format --check, mypy
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy

# The benchmark runs on its own stack (own ports, own database swarm_bench), never on dev or test.
BENCH_STACK ?= bench
BENCH_PORT_BASE ?= 43000
# The broker's statistics every minute, not every 5 s: the collectors' CPU grows with the
# connections (docs/performance.md, Connections). Applies when the stack starts.
BENCH_STATS_INTERVAL_MS ?= 60000

bench: install ## the full benchmark: prints a table, JSON in bench-results/ (BENCH_ARGS=... to pass options)
	@SWARM_BROKER_STATS_INTERVAL_MS=$(BENCH_STATS_INTERVAL_MS) \
		$(VENV)/python -m bench --stack $(BENCH_STACK) --port-base $(BENCH_PORT_BASE) $(BENCH_ARGS)

bench-short: install ## the benchmark's CI mode (under a minute): checks the harness works, not the speed
	@$(VENV)/python -m bench --short --stack $(BENCH_STACK) --port-base $(BENCH_PORT_BASE) $(BENCH_ARGS)

compose-check: ## validate docker-compose.yml (no engine needed)
	docker-compose -f docker-compose.yml config -q
