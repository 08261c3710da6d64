# The two commands a newcomer needs: `make run` (the broker on its embedded defaults, with a
# local AWS emulator) and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := proto/broker/v1/broker.proto

.PHONY: run test lint proto bench reliability clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,test,lint]'
	touch $(STAMP)

node_modules/.bin/buf: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## run: start the broker on its embedded defaults (SQLite + a local AWS emulator), on 127.0.0.1:50051
run: $(STAMP)
	$(BIN)/broker dev

## test: the whole test suite (unit and end to end against the local AWS emulator)
test: $(STAMP)
	$(BIN)/pytest

## reliability: the fault-injection scenarios alone; the table goes to docs/reliability.md
reliability: $(STAMP)
	BROKER_RELIABILITY_REPORT=docs/reliability.md $(BIN)/pytest -q tests/test_reliability.py tests/test_partition.py tests/test_fair_share.py

## bench: the broker beside the ceilings of its stack (a few minutes); writes docs/benchmarks.md
bench: $(STAMP)
	bash scripts/h2load.sh >/dev/null
	$(BIN)/python -m bench --out docs

## lint: ruff, mypy, buf lint, cfn-lint, hadolint
lint: $(STAMP) node_modules/.bin/buf
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	node_modules/.bin/buf lint
	$(BIN)/cfn-lint deploy/cloudformation/customer-role.yaml
	$(BIN)/hadolint deploy/Dockerfile

## proto: regenerate src/broker/v1 from the contract (checked in; tests/test_proto_fresh.py fails on drift)
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py src

clean:
	rm -rf $(VENV) node_modules broker.db
