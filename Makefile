# sous — see README.md. Every target works on a fresh clone.
SHELL := /bin/bash
GO ?= go
OLLAMA_VERSION ?= v0.6.5
CACHE := $(CURDIR)/.cache
OLLAMA_BIN := $(CACHE)/bin/ollama
# Iterations, not seconds: on a loaded machine a timed run can end in
# "context deadline exceeded" from the fuzzing engine itself, not a finding.
FUZZTIME ?= 20000x
# go-nvml's cgo prologue calls NVML functions its header marks deprecated:
# dozens of gcc warnings on every cold build, none of them ours. Go's
# default flags plus silence for that one warning; set CGO_CFLAGS to override.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

# The one build command: the Dockerfile's build stage runs exactly this line
# (a test checks it), so what CI builds is what ships.
GO_BUILD_FLAGS = -trimpath -ldflags="-s -w"
GO_BUILD = CGO_ENABLED=1 $(GO) build $(GO_BUILD_FLAGS) -o bin/
# The same without cgo, for make build-nocgo.
GO_BUILD_NOCGO = CGO_ENABLED=0 $(GO) build $(GO_BUILD_FLAGS) -o bin/nocgo/

.PHONY: build
build: build-gateway build-scaler
	$(GO_BUILD) ./cmd/worker ./cmd/sousctl

# The OpenAI-compatible gateway (bin/gateway); the Dockerfile's gateway-build
# stage runs exactly this line (deploy/gateway_test.go checks it).
.PHONY: build-gateway
build-gateway:
	$(GO_BUILD) ./cmd/gateway

# The worker without cgo, so without NVML: for engine images whose glibc is
# older than the build stage's (vLLM's and llama.cpp's are Ubuntu 22.04,
# glibc 2.35). Those engines own their GPU memory and say their slots in
# their gauges, which the worker adapts to. The Dockerfile's build-nocgo
# stage runs exactly this target (deploy/engines_test.go checks it).
.PHONY: build-nocgo
build-nocgo:
	$(GO_BUILD_NOCGO) ./cmd/worker ./cmd/sousctl

# The KEDA external scaler (bin/scaler); the Dockerfile's scaler-build stage
# runs exactly this line (deploy/scaler_test.go checks it).
.PHONY: build-scaler
build-scaler:
	$(GO_BUILD) ./cmd/scaler

# The dev Ollama server, built from its Go module (newer module versions lack
# vendored C headers in their zips). Cached under .cache/; seconds once the Go
# build cache has it, about 5 minutes cold on 2 cores.
$(OLLAMA_BIN):
	@echo "== building the dev Ollama $(OLLAMA_VERSION) from its Go module into .cache/bin, once:"
	@echo "   about 5 minutes on 2 cores (the Go build cache makes later builds take seconds)"
	GOBIN=$(CACHE)/bin $(GO) install github.com/ollama/ollama@$(OLLAMA_VERSION)
	@echo "== the dev Ollama is built: $(OLLAMA_BIN)"

.PHONY: ollama
ollama: $(OLLAMA_BIN)

.PHONY: rabbitmq
rabbitmq:
	@scripts/ensure-rabbitmq.sh

# A Docker engine for the container tests and `make images`: installs
# docker.io when missing and starts dockerd without iptables or a bridge
# (containers use the host's network). `scripts/ensure-docker.sh stop` stops
# the dockerd it started.
.PHONY: docker
docker:
	@scripts/ensure-docker.sh

# sous-worker:dev, sous-worker-ollama:dev, sous-gateway:dev and
# sous-scaler:dev from the Dockerfile, on stand-in
# bases built here from Debian packages (no registry needed; see
# deploy/README.md), plus the RabbitMQ image the container tests start.
# Prints each step's time and the images' sizes. Cold: one debootstrap and the
# Go build (minutes); warm: seconds, docker keeps the stand-ins.
.PHONY: images
images: ollama docker
	OLLAMA_BIN=$(OLLAMA_BIN) scripts/images.sh

# The images for `make test`: where no Docker engine can start, the
# container tests skip, except in CI (CI=true), where that fails.
.PHONY: test-images
test-images: ollama
	@if scripts/ensure-docker.sh; then OLLAMA_BIN=$(OLLAMA_BIN) scripts/images.sh; \
	elif [ "$$CI" = true ]; then echo "CI=true: the container tests need a Docker engine" >&2; exit 1; \
	else echo "make test: no Docker engine; the container tests will skip"; fi

# Push the images (sous-worker, sous-worker-ollama, sous-gateway,
# sous-scaler) to any OCI registry and print each one's
# digest, REGISTRY/NAME@sha256:... (scripts/push.sh):
#   make push REGISTRY=ghcr.io/OWNER [TAG=0.1.0] [PLATFORMS=linux/amd64,linux/arm64]
# TAG defaults to the tag the manifests use (deploy/k8s/images). BASES=standin
# pushes the stand-in builds of `make images` instead (this machine's
# platform only; what deploy/push_test.go pushes to a loopback registry).
.PHONY: push
push:
	@REGISTRY="$(REGISTRY)" TAG="$(TAG)" PLATFORMS="$(PLATFORMS)" BASES="$(BASES)" scripts/push.sh

# The control plane, the KEDA operator and KEDA's metrics apiserver for
# integration/k8s, helm for the chart's tests (deploy/, integration/k8s),
# and the node's kube-scheduler and kubelet, each built from its Go module
# into .cache/k8s (scripts/build-k8s.sh): 11 minutes cold on 2 idle cores
# (684 s measured 2026-12-06, helm and the node included: the kubelet and
# kube-scheduler share most of the control plane's packages, 27 s more),
# one binary at a time; seconds once built.
.PHONY: k8s
k8s:
	@scripts/build-k8s.sh

# Only kube-scheduler and the kubelet (tools/node, the control plane's
# k8s.io/kubernetes release; `make k8s` builds them too). The node tests
# also need root, Docker with `make images` done, and Debian's containerd,
# runc and containernetworking-plugins (scripts/ensure-node.sh;
# docs/design/kubelet.md). `make test` runs them with the rest of
# integration/k8s; `make test-k8s-node` runs only them; SOUS_K8S_NODE=0
# turns them off.
.PHONY: k8s-node
k8s-node:
	@scripts/build-k8s.sh node

.PHONY: test-k8s-node
test-k8s-node: k8s test-images
	@scripts/ensure-node.sh
	$(GO) test -count=1 -timeout 20m -v -run 'TestNode' ./integration/k8s

# Qpid Proton for the Service Bus protocol test double (a Debian package;
# installs only when missing).
.PHONY: sbpeer
sbpeer:
	@internal/queue/servicebus/sbpeer/install.sh

# Unit and integration tests with the race detector, a short fuzz run of the
# request decoder, and every benchmark for a few iterations (to prove they
# run; figures come from `make bench`). go.mod must be tidy: `go mod tidy
# -diff` prints what tidy would change and exits non-zero when it is not.
.PHONY: test
# The integration suite's end-to-end checks run a second time on a RabbitMQ
# container started with testcontainers-go (SOUS_IT_BROKER).
# Each step prints the time it starts, so a slow run's log says where it went.
STEP = @echo "== make test: $$(date -u +%H:%M:%S)"
test: ollama rabbitmq sbpeer test-images k8s
	$(STEP) vet
	$(GO) vet ./...
	$(GO) mod tidy -diff
	$(STEP) unit and integration tests, integration/k8s beside them
	# integration/k8s (verbose: the scaling transitions and their timings are
	# the point) waits on control planes, kubelets and KEDA's polls far more
	# than it computes, so it runs beside the other packages, its log printed
	# once both are done: about 10 minutes alone, a few added beside them.
	mkdir -p $(CACHE); \
	$(GO) test -race -count=1 -timeout 25m -v ./integration/k8s > $(CACHE)/k8s-test.log 2>&1 & k8s=$$!; \
	SOUS_OLLAMA_BIN=$(OLLAMA_BIN) SOUS_SKIP_IMAGE_BUILD=1 $(GO) test -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v /integration/k8s$$); rc=$$?; \
	wait $$k8s; krc=$$?; \
	echo "== make test: $$(date -u +%H:%M:%S) integration/k8s, run beside the others (exit $$krc):"; \
	cat $(CACHE)/k8s-test.log; \
	[ $$rc = 0 ] && [ $$krc = 0 ]
	$(STEP) testcontainers
	time SOUS_OLLAMA_BIN=$(OLLAMA_BIN) SOUS_SKIP_IMAGE_BUILD=1 SOUS_IT_BROKER=testcontainers $(GO) test -race -count=1 -timeout 10m \
	  -run 'TestPromptAndChatEndToEnd|TestSousctlDirectReplyTo|TestBadInputDeadLettered|TestSIGTERMDrains' ./integration
	$(STEP) fuzz
	$(GO) test -run='^$$' -fuzz=FuzzDecodeRequest -fuzztime=$(FUZZTIME) ./internal/wire
	$(GO) test -run='^$$' -fuzz=FuzzDeliveryHeaders -fuzztime=$(FUZZTIME) ./internal/queue/rabbitmq
	$(GO) test -run='^$$' -fuzz=FuzzTranslate -fuzztime=$(FUZZTIME) ./internal/gateway
	$(STEP) benchmarks, 3 iterations each
	$(GO) test -run='^$$' -bench=. -benchtime=3x ./...
	$(STEP) done

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
# sous reports its ratio to the baseline of that run ("x..." metrics). b.N
# is the number of requests, fixed here so every design does the same work.
# This shared machine makes every throughput group noisy: each runs three
# times.
BENCH = SOUS_OLLAMA_BIN=$(OLLAMA_BIN) $(GO) test -run='^$$' -count=1
.PHONY: bench
bench: ollama rabbitmq
	for i in 1 2 3; do $(BENCH) -bench='MixedLengths' -benchtime=3200x ./integration/bench || exit 1; done
	for i in 1 2 3; do $(BENCH) -bench='Uniform' -benchtime=3200x ./integration/bench || exit 1; done
	for i in 1 2 3; do $(BENCH) -bench='RealOllama' -benchtime=800x ./integration/bench || exit 1; done
	for i in 1 2 3; do $(BENCH) -bench='BrokerPath' -benchtime=10000x ./integration/bench || exit 1; done
	$(BENCH) -bench='^BenchmarkLanes$$' -benchtime=100x ./integration/bench
	$(BENCH) -bench='LaneShare' -benchtime=100x ./integration/bench
	$(BENCH) -bench='LaneDeadlines' -benchtime=50x ./integration/bench
	$(BENCH) -bench='LowLoadLatency' -benchtime=1000x ./integration/bench
	$(BENCH) -bench='Batching' -benchtime=1280x ./integration/bench
	$(BENCH) -bench='GatewayAddedLatency' -benchtime=1000x ./integration/bench
	$(BENCH) -bench='GatewayOpenStreams' -benchtime=20x ./integration/bench
	$(BENCH) -bench='GatewayTimeToFirstToken' -benchtime=200x ./integration/bench
	$(BENCH) -bench='BatchAPI' -benchtime=50000x ./integration/bench
	$(BENCH) -bench=. -benchmem ./internal/batch ./internal/sizing ./internal/telemetry ./internal/inference/ollama

# On a machine with an NVIDIA GPU (the device tool): NVML through go-nvml,
# the sizing decision, and the dispatch comparisons where RabbitMQ exists.
.PHONY: gpu-check
gpu-check:
	@scripts/gpu-check.sh

# The same checks on a GPU machine that has no Go, no RabbitMQ and no
# network (the device tool's): prebuilt binaries, the dev Ollama and this
# machine's RabbitMQ in .cache/gpu; carry it and run scripts/gpu-device.sh.
.PHONY: gpu-bundle
gpu-bundle: ollama
	@scripts/gpu-bundle.sh

# A CPU profile of the broker path comparison (BenchmarkBrokerPath), with
# where each design's time goes: the designs' goroutines carry the pprof
# label design=sous or design=handwritten. The profile and the test binary
# stay in .cache/profile for `go tool pprof`.
PROFILE := $(CACHE)/profile
.PHONY: bench-profile
bench-profile: rabbitmq
	mkdir -p $(PROFILE)
	$(BENCH) -bench='BrokerPath' -benchtime=10000x -o $(PROFILE)/bench.test -cpuprofile=$(PROFILE)/brokerpath.pprof ./integration/bench
	$(GO) tool pprof -top -nodecount=35 -tagfocus=design=sous $(PROFILE)/bench.test $(PROFILE)/brokerpath.pprof
	$(GO) tool pprof -top -nodecount=35 -tagfocus=design=handwritten $(PROFILE)/bench.test $(PROFILE)/brokerpath.pprof

.PHONY: fuzz
fuzz:
	$(GO) test -run='^$$' -fuzz=FuzzDecodeRequest -fuzztime=3m ./internal/wire
	$(GO) test -run='^$$' -fuzz=FuzzDeliveryHeaders -fuzztime=3m ./internal/queue/rabbitmq
	$(GO) test -run='^$$' -fuzz=FuzzTranslate -fuzztime=3m ./internal/gateway

.PHONY: clean
clean:
	rm -rf bin
