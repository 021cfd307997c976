# Every target sets up what it needs: a fresh clone runs `make run` or `make test` directly.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed
# checkov pins packaging (and more) differently from constraints.txt: its own virtualenv.
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov
KUBECTL := $(VENV)/bin/kubectl
RENDERED := build/k8s
OVERLAYS := development production
# Only the versioned package is generated: src/user/__init__.py is committed, so a service whose
# Python package shares the proto package's name (see `make new-service`) keeps its own.
GENERATED_DIR := src/user/v1
# What ruff checks; wildcard, as a generated service may lack some (see tools/template.toml).
PYTHON_PATHS := $(wildcard src tests benchmarks examples tools/protoc-gen-grpc_python tools/*.py)
DEV_ENV := USERSERVICE_DEV=true USERSERVICE_AUTH_JWT_SECRET=$${USERSERVICE_AUTH_JWT_SECRET:-dev-secret-do-not-use-in-production-0123456789}

.PHONY: help setup run test fuzz soak lint format typecheck generate check-generated vendor-protos new-service update-from-template buf-lint buf-breaking deploy-check image-test bench profile docs config-page ci clean token

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

# package.json pins buf exactly and buf pins its per-platform binary package, so no lock
# file is kept: npm would record only the platforms its registry served on the machine
# that wrote the lock, and `npm ci` elsewhere would then refuse it.
$(BUF): package.json
	npm install --silent --no-audit --no-fund --no-package-lock
	touch $@

$(CHECKOV): tools/checkov-constraints.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --constraint tools/checkov-constraints.txt checkov
	touch $@

setup: $(STAMP) $(BUF) ## Create .venv and install Python and buf tooling.

generate: $(STAMP) $(BUF) ## Regenerate Python stubs and .pyi type stubs from proto/.
	rm -rf $(GENERATED_DIR)
	$(BUF) generate
	touch $(GENERATED_DIR)/__init__.py

check-generated: $(STAMP) $(BUF) ## Fail if the committed stubs differ from a fresh generation.
	@tmp=$$(mktemp -d) && cp -r $(GENERATED_DIR) $$tmp/committed && \
	  $(MAKE) --no-print-directory generate >/dev/null && \
	  if ! diff -r $$tmp/committed $(GENERATED_DIR); then \
	    echo "Generated stubs are stale: run 'make generate' and commit the result." >&2; \
	    rm -rf $(GENERATED_DIR) && cp -r $$tmp/committed $(GENERATED_DIR); rm -rf $$tmp; exit 1; \
	  fi; rm -rf $$tmp; echo "generated stubs are up to date"

GOOGLEAPIS_PROTOS := google/api/field_behavior.proto google/rpc/status.proto google/rpc/error_details.proto \
  google/api/annotations.proto google/api/client.proto google/api/http.proto google/api/launch_stage.proto
# The wheel ships google/longrunning/operations.proto as operations_proto.proto (its Python
# module name); the file's own name, and so the import path, is operations.proto.
LONGRUNNING_PROTO := google/longrunning/operations.proto

vendor-protos: $(STAMP) ## Copy the googleapis protos from the pinned googleapis-common-protos wheel.
	@site=$$($(PY) -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])') && \
	  for proto in $(GOOGLEAPIS_PROTOS); do install -D -m 644 "$$site/$$proto" "third_party/googleapis/$$proto"; done && \
	  install -D -m 644 "$$site/google/longrunning/operations_proto.proto" "third_party/googleapis/$(LONGRUNNING_PROTO)"

buf-lint: $(BUF) ## buf lint (STANDARD).
	$(BUF) lint
	@# third_party/ is vendored verbatim (vendor-protos), not ours to reformat.
	$(BUF) format proto --diff --exit-code

buf-breaking: $(BUF) ## buf breaking against the previous commit of main.
	@if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then \
	  $(BUF) breaking --against '.git#ref=HEAD~1' && echo "buf breaking: no breaking change against HEAD~1"; \
	else echo "buf breaking: HEAD~1 has no proto/ to compare against, nothing to check"; fi

lint: $(STAMP) ## ruff lint and format check; the import contracts (pyproject.toml).
	$(VENV)/bin/ruff check $(PYTHON_PATHS)
	$(VENV)/bin/ruff format --check $(PYTHON_PATHS)
	$(VENV)/bin/lint-imports

format: $(STAMP) ## Apply ruff formatting and fixes.
	$(VENV)/bin/ruff check --fix $(PYTHON_PATHS)
	$(VENV)/bin/ruff format $(PYTHON_PATHS)

typecheck: $(STAMP) ## mypy --strict on src/.
	$(VENV)/bin/mypy --strict

test: $(STAMP) ## Run the whole test suite.
	$(PY) -m pytest

FUZZ_REQUESTS ?= 20000

# A fresh seed each run unless one is given; it is printed, and a failure names it too.
fuzz: $(STAMP) ## Wire-fuzz a real server: make fuzz FUZZ_REQUESTS=20000 [FUZZ_SEED=9]
	@seed=$(or $(FUZZ_SEED),$$RANDOM); \
	  echo "make fuzz: $(FUZZ_REQUESTS) requests per storage backend, seed $$seed"; \
	  USERSERVICE_FUZZ_REQUESTS=$(FUZZ_REQUESTS) USERSERVICE_FUZZ_SEED=$$seed \
	  $(PY) -m pytest tests/system/test_fuzz.py -q -p no:cacheprovider

SOAK_MINUTES ?= 3

# Needs the PostgreSQL and Redis of `make test`; starts and stops everything else itself.
soak: $(STAMP) ## Mixed load, the fuzzer, PostgreSQL and Redis cuts, SIGTERM restarts: make soak SOAK_MINUTES=3
	PYTHONPATH=tests $(PY) tests/system/soak.py --minutes $(SOAK_MINUTES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

deploy-check: $(STAMP) $(CHECKOV) ## Render every overlay, validate it offline, run checkov on production, lint the Dockerfile.
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	for overlay in $(OVERLAYS); do \
	  $(KUBECTL) kustomize deploy/k8s/overlays/$$overlay > $(RENDERED)/$$overlay.yaml || exit 1; \
	  $(VENV)/bin/kubernetes-validate --strict --quiet $(RENDERED)/$$overlay.yaml || exit 1; \
	  echo "$$overlay: rendered to $(RENDERED)/$$overlay.yaml, valid"; \
	done
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/overlays/production/secret.example.yaml
	$(CHECKOV) --quiet --compact --skip-download --framework kubernetes --file $(RENDERED)/production.yaml
	$(PY) -m pytest -q -p no:cacheprovider tests/contract/test_deploy.py
	$(VENV)/bin/hadolint Dockerfile

# Root only, as CI runs: podman (with the runc runtime), mmdebstrap for the stand-in base image.
image-test: $(STAMP) ## Build the image with podman and run it locked down (installs podman, runc, mmdebstrap).
	@missing=; for tool in podman runc mmdebstrap; do command -v $$tool >/dev/null || missing=1; done; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman runc mmdebstrap; \
	  fi
	$(PY) tools/image_test.py

run: $(STAMP) ## Serve on :50051 with the SQLite store (development auth secret).
	@mkdir -p var
	$(DEV_ENV) $(VENV)/bin/userservice serve

token: $(STAMP) ## Mint a development token: make token SCOPES="users.read users.write".
	@$(DEV_ENV) $(VENV)/bin/userservice token --subject dev --scopes "$${SCOPES:-users.read users.write users.admin}" --ttl 1h

new-service: ## Write a renamed copy (tools/template.toml): make new-service NAME=orders RESOURCE=Order [DEST=../orders] [MINIMAL=1]
	@test -f tools/new_service.py || { echo "make new-service: a generated service has no generator; run it in the template" >&2; exit 2; }
	@test -n "$(NAME)" -a -n "$(RESOURCE)" || { echo "usage: make new-service NAME=orders RESOURCE=Order [DEST=../orders] [PLURAL=Orders] [MINIMAL=1]" >&2; exit 2; }
	$(PYTHON) tools/new_service.py --name "$(NAME)" --resource "$(RESOURCE)" $(if $(PLURAL),--plural "$(PLURAL)") $(if $(DEST),--dest "$(DEST)") $(if $(MINIMAL),--minimal)

# In a generated service: merge what the template changed since .template.json's commit.
update-from-template: $(STAMP) ## Merge the template's changes since this service's commit: [TEMPLATE=url] [REF=main]
	$(PY) tools/update_from_template.py $(if $(TEMPLATE),--template "$(TEMPLATE)") $(if $(REF),--to "$(REF)")
	$(MAKE) --no-print-directory generate

bench: $(STAMP) ## Every scenario vs the bare floor and benchmarks/targets.toml; results in .bench/ (ARGS="--quick", ...).
	$(PY) -m benchmarks $(ARGS)

profile: $(STAMP) ## py-spy on the server under one bench scenario: make profile ARGS="import".
	$(PY) -m benchmarks.profile $(ARGS)

# --strict: a broken link or anchor, or a page missing from the nav, fails (mkdocs.yml validation).
docs: $(STAMP) ## Build the documentation site into build/site (mkdocs-material, --strict).
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "docs: built into build/site"

config-page: $(STAMP) ## Regenerate the settings table of docs/configuration.md from config/settings.py.
	$(PY) tools/settings_page.py

ci: lint typecheck buf-lint buf-breaking check-generated deploy-check docs test ## Everything CI runs.

clean: ## Remove the virtualenv, node_modules and local data.
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules var build .pytest_cache .mypy_cache .ruff_cache .hypothesis
