# agentry — the two commands of the README are `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GO ?= go
BIN := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/agentry/agentry/internal/app.Version=$(VERSION)
# Tests and `make run` use the local servers (see DEVELOPERS.md).
PG_URL ?= postgres://postgres@127.0.0.1:5432/test?sslmode=disable

.PHONY: run test test-go test-helm bench lint build migrate docker services fuzz clean

## run: start PostgreSQL and Redis if needed, migrate, seed the first admin, then run api + worker + scheduler
run: services build
	@$(BIN)/api migrate up
	@$(BIN)/api seed-admin
	@$(GO) build -o $(BIN)/devrun ./internal/devrun
	@exec $(BIN)/devrun $(BIN)

## build: build the three binaries into bin/
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/api ./cmd/worker ./cmd/scheduler

## migrate: apply pending migrations to the database of the settings
migrate: services
	$(GO) run ./cmd/api migrate up

## test: start PostgreSQL and Redis if needed, then run every test (race detector on)
test: services test-go test-helm

test-go:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 8m ./...

test-helm:
	@if [ -f helm/go.mod ]; then cd helm && $(GO) test -count=1 ./...; fi

## bench: the benchmark harness; prints one BENCH line per comparison
bench: services
	$(GO) run ./internal/bench

## fuzz: run each fuzz target for a while (FUZZTIME=30s by default)
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for target in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$target"; $(GO) test -run '^$$' -fuzz "^$$target$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

## lint: gofmt, go vet and staticcheck
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

## docker: build the image holding the three binaries (needs a Docker engine)
docker:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t agentry:$(VERSION) .

## services: make sure PostgreSQL and Redis answer on localhost, starting them if installed
services:
	@if ! (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null; then \
	  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then \
	    echo "starting PostgreSQL"; pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  else \
	    echo "PostgreSQL is not running on 127.0.0.1:5432 and is not installed here."; \
	    echo "Install PostgreSQL 15+ (Debian: apt-get install postgresql) or point AGENTRY_DATABASE_URL / AGENTRY_TEST_DATABASE_URL at one."; \
	    exit 1; \
	  fi; \
	fi
	@if ! (echo > /dev/tcp/127.0.0.1/6379) 2>/dev/null; then \
	  if command -v redis-server >/dev/null; then \
	    echo "starting Redis"; redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null; \
	  else \
	    echo "Redis is not running on 127.0.0.1:6379 and is not installed here."; \
	    echo "Install Redis 7 (Debian: apt-get install redis-server) or point AGENTRY_REDIS_URL / AGENTRY_TEST_REDIS_URL at one."; \
	    exit 1; \
	  fi; \
	fi
	@for i in $$(seq 1 60); do \
	  if (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null && (echo > /dev/tcp/127.0.0.1/6379) 2>/dev/null; then exit 0; fi; sleep 0.5; \
	done; echo "PostgreSQL or Redis did not come up within 30s"; exit 1

clean:
	rm -rf $(BIN)
