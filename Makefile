# sous — see README.md. Every target works on a fresh clone.
SHELL := /bin/bash
GO ?= go
OLLAMA_VERSION ?= v0.6.5
CACHE := $(CURDIR)/.cache
OLLAMA_BIN := $(CACHE)/bin/ollama
FUZZTIME ?= 10s
# go-nvml's cgo prologue calls NVML functions its header marks deprecated:
# dozens of gcc warnings on every cold build, none of them ours. Go's
# default flags plus silence for that one warning; set CGO_CFLAGS to override.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

# The one build command: the Dockerfile's build stage runs exactly this line
# (a test checks it), so what CI builds is what ships.
GO_BUILD = CGO_ENABLED=1 $(GO) build -trimpath -ldflags="-s -w" -o bin/

.PHONY: build
build:
	$(GO_BUILD) ./cmd/worker ./cmd/sousctl

# The dev Ollama server, built from its Go module (newer module versions lack
# vendored C headers in their zips). Cached under .cache/; seconds once the Go
# build cache has it, about 5 minutes cold on 2 cores.
$(OLLAMA_BIN):
	GOBIN=$(CACHE)/bin $(GO) install github.com/ollama/ollama@$(OLLAMA_VERSION)

.PHONY: ollama
ollama: $(OLLAMA_BIN)

.PHONY: rabbitmq
rabbitmq:
	@scripts/ensure-rabbitmq.sh

# Qpid Proton for the Service Bus protocol test double (a Debian package;
# installs only when missing).
# The control plane and the KEDA operator for integration/k8s, each built
# from its Go module into .cache/k8s (scripts/build-k8s.sh): about 15
# minutes cold on 2 cores, one binary at a time; seconds once built.
.PHONY: k8s
k8s:
	@scripts/build-k8s.sh

.PHONY: sbpeer
sbpeer:
	@internal/queue/servicebus/sbpeer/install.sh

# Unit and integration tests with the race detector, a short fuzz run of the
# request decoder, and every benchmark for a few iterations (to prove they
# run; figures come from `make bench`).
.PHONY: test
test: ollama rabbitmq sbpeer k8s
	$(GO) vet ./...
	SOUS_OLLAMA_BIN=$(OLLAMA_BIN) $(GO) test -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v /integration/k8s$$)
	# Verbose: the scaling transitions and their timings are the point.
	$(GO) test -race -count=1 -timeout 15m -v ./integration/k8s
	$(GO) test -run='^$$' -fuzz=FuzzDecodeRequest -fuzztime=$(FUZZTIME) ./internal/wire
	$(GO) test -run='^$$' -fuzz=FuzzDeliveryHeaders -fuzztime=$(FUZZTIME) ./internal/queue/rabbitmq
	$(GO) test -run='^$$' -bench=. -benchtime=3x ./...

# The first run: RabbitMQ (started if down), the dev Ollama with a tiny
# random-weight model, the worker; publishes a few prompts with sousctl and
# prints the results; stops what it started.
.PHONY: demo
demo: build ollama rabbitmq
	@scripts/demo.sh

# Run the worker against your own engine and broker:
#   SOUS_ENGINE_URL=http://localhost:11434 SOUS_MODEL=llama3.2 make run
.PHONY: run
run: build
	./bin/worker

# The figures in docs/benchmarks.md come from this target; each group runs
# the designs it compares side by side, one after the other, in one run, and
# the later designs report their ratio to the baseline ("x..." metrics).
# b.N is the number of requests, fixed here so every design does the same
# work. The groups this shared machine makes noisy run three times.
BENCH = SOUS_OLLAMA_BIN=$(OLLAMA_BIN) $(GO) test -run='^$$' -count=1
.PHONY: bench
bench: ollama rabbitmq
	for i in 1 2 3; do $(BENCH) -bench='Overhead' -benchtime=3000x ./integration/bench || exit 1; done
	$(BENCH) -bench='Batching/design=sous' -benchtime=1280x ./integration/bench
	$(BENCH) -bench='Batching/design=one' -benchtime=60x ./integration/bench
	$(BENCH) -bench='LowLoadLatency' -benchtime=1000x ./integration/bench
	for i in 1 2 3; do $(BENCH) -bench='RealOllama' -benchtime=800x ./integration/bench || exit 1; done
	$(BENCH) -bench=. -benchmem ./internal/batch ./internal/sizing ./internal/telemetry ./internal/inference/ollama

.PHONY: fuzz
fuzz:
	$(GO) test -run='^$$' -fuzz=FuzzDecodeRequest -fuzztime=3m ./internal/wire
	$(GO) test -run='^$$' -fuzz=FuzzDeliveryHeaders -fuzztime=3m ./internal/queue/rabbitmq

.PHONY: clean
clean:
	rm -rf bin
