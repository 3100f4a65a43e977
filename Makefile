# One entry point for people and CI. `make test` installs everything it needs on a fresh
# Debian 12 machine (system packages, the venv, the local broker and Redis) and runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
COMPOSE := $(BIN)/docker-compose
DOCKER_COMPOSE ?= docker compose

.PHONY: install test unit integration lint bench bench-live bench-writepath bench-peers demo demo-down up down logs load-test clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system.sh
	bash scripts/install_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install lint
	$(BIN)/python -m pytest tests -v

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install
	$(BIN)/python -m pytest tests/integration -v

lint: install
	$(BIN)/ruff check .
	$(COMPOSE) -f docker-compose.yml config -q
	$(COMPOSE) -f docker-compose.yml --profile load-test config -q
	$(BIN)/hadolint capture/Dockerfile flow_processor/Dockerfile traffic_generator/Dockerfile

# The capture path in process (its end-to-end section left to bench_writepath; 6 inspection
# samples a row instead of 40), live capture against tcpdump, and the write path on workloads
# A, B and S with ndpiReader and nfstream beside it (every run for A and B, paired with
# capture's run; once for S), and capture's memory under a flood of unfinished TLS handshakes.
# 7-15 minutes on a host with two CPU cores, by how busy it is (QUICK=1: under 3 minutes;
# bench/README.md).
bench: install
	$(BIN)/python bench/bench_live.py $(if $(QUICK),--quick)
	$(BIN)/python bench/bench_inspect_memory.py --only after $(if $(QUICK),--flows 20000)
	$(BIN)/python bench/bench_writepath.py $(if $(QUICK),--quick --runs 1 --max-wait 5 --max-wait-alone 5)

# The capture file path stage by stage (read, decode, batching, inspection on and off) and the
# record encoding, in process, on 1,000,000 frames (about 1.5 minutes)
bench-pipeline: install
	$(BIN)/python bench/bench_pipeline.py --no-e2e $(if $(QUICK),--quick --inspection-rounds 5,--inspection-rounds 6)

# capture --pcap against ndpiReader (Debian libndpi-bin) and nfstream 6.6.0 (installed by the
# script, a bench-only dependency) on the same files (about 2 minutes).
bench-peers: install
	$(BIN)/python bench/bench_peers.py $(if $(QUICK),--quick)

# Live capture on a loopback flood against tcpdump only (QUICK=1: about a minute).
bench-live: install
	$(BIN)/python bench/bench_live.py $(if $(QUICK),--quick)

# The write path on workloads A, B and S (1,000,000 frames each): capture alone, processor
# alone, end to end, against ndpiReader and nfstream; median of 3 (about 10 minutes).
# VARIANTS=before,after also runs git HEAD's processor beside the working tree's.
bench-writepath: install
	$(BIN)/python bench/bench_writepath.py $(if $(QUICK),--quick) $(if $(VARIANTS),--variants $(VARIANTS))

# The same services as compose, as local processes (no Docker engine needed), shown by the
# terminal view (python -m dpi_top). Ctrl-C or `make demo-down` (another terminal) stops it.
demo: install
	bash scripts/demo.sh up

demo-down:
	bash scripts/demo.sh down

up:
	$(DOCKER_COMPOSE) up -d --build

down:
	$(DOCKER_COMPOSE) down

logs:
	$(DOCKER_COMPOSE) logs -f --tail=100

load-test:
	$(DOCKER_COMPOSE) --profile load-test up -d traffic-generator

clean:
	rm -rf $(VENV) .cache .run .pytest_cache
