# sous — see README.md. Every target works on a fresh clone.
SHELL := /bin/bash
GO ?= go
OLLAMA_VERSION ?= v0.6.5
CACHE := $(CURDIR)/.cache
OLLAMA_BIN := $(CACHE)/bin/ollama

# The one build command: the Dockerfile's build stage runs exactly this line
# (a test checks it), so what CI builds is what ships.
GO_BUILD = CGO_ENABLED=1 $(GO) build -trimpath -ldflags="-s -w" -o bin/

.PHONY: build
build:
	$(GO_BUILD) ./cmd/worker ./cmd/sousctl

# The dev Ollama server, built from its Go module (newer module versions lack
# vendored C headers in their zips). Cached under .cache/; seconds once built.
$(OLLAMA_BIN):
	GOBIN=$(CACHE)/bin $(GO) install github.com/ollama/ollama@$(OLLAMA_VERSION)

.PHONY: ollama
ollama: $(OLLAMA_BIN)
