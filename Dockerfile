# sous images. deploy/dockerfile_test.go keeps this file honest (stages,
# pinned bases, non-root users, the build command, glibc); `make images` builds
# the four targets below and the container tests run them (deploy/README.md).
#
#   docker build --target worker        -t sous-worker .
#   docker build --target worker-ollama -t sous-worker-ollama .
#   docker build --target gateway       -t sous-gateway .
#   docker build --target scaler        -t sous-scaler .
#
# Versions are pinned by tag. Pin digests in the release pipeline
# (docker buildx imagetools inspect <ref>). No registry was reachable where this
# file was written, and an unverified digest is worse than a tag.

# The bases are build arguments whose defaults are the real, pinned images
# (the checks read the defaults). `make images` passes stand-ins built from
# Debian packages where no registry is reachable; deploy/README.md says how
# they differ.
ARG GO_IMAGE=golang:1.26.8-bookworm
ARG WORKER_BASE=gcr.io/distroless/base-debian12:nonroot
ARG OLLAMA_IMAGE=ollama/ollama:0.17.4
# The gateway's and the scaler's base (both CPU-only Go servers).
ARG GATEWAY_BASE=gcr.io/distroless/base-nossl-debian12:nonroot
# The engines of worker-vllm and worker-llamacpp. Neither could be pulled
# where this was written: their stages are checked statically
# (deploy/engines_test.go). llama.cpp publishes build tags (bNNNN), not
# versions: its tag is pinned by the index digest GitHub's package page
# gives for it.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
ARG LLAMACPP_IMAGE=ghcr.io/ggml-org/llama.cpp:server-cuda12-b9603@sha256:841b199aed2649a748875b043b32fed2e8c2d4d87e1d563556817fb7fa44b72b

# The build stage's Debian release sets the glibc the cgo binary needs
# (bookworm: 2.36). Every final stage must ship that glibc or newer.
FROM ${GO_IMAGE} AS build
WORKDIR /src
# Unset: Go's default proxy. `make images` points it at a loopback server
# of this machine's module cache, so the build needs no network.
ARG GOPROXY
# Fail instead of downloading a toolchain when go.mod asks for a newer Go.
ENV GOTOOLCHAIN=local
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
# Exactly the Makefile's build command (GO_BUILD plus the build target's
# packages), so what CI builds with `make build` is what ships.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=1 go build -trimpath -ldflags="-s -w" -o bin/ ./cmd/worker ./cmd/sousctl

# worker: the worker alone, for an engine it does not own (SOUS_ENGINE_URL).
# distroless/base has glibc, which go-nvml needs: it dlopens libnvidia-ml at run time.
FROM ${WORKER_BASE} AS worker
COPY --from=build /src/bin/worker /usr/local/bin/sous-worker
COPY --from=build /src/bin/sousctl /usr/local/bin/sousctl
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sous-worker"]

# worker-ollama: the official Ollama image plus the worker, which starts
# `ollama serve` as its child (no sidecar). The tag matches the
# github.com/ollama/ollama version in go.mod (the API client the worker is
# built against); its base is ubuntu:24.04 (glibc 2.39). Ollama images before
# that were ubuntu:20.04 (glibc 2.31) and could not run a bookworm cgo binary.
FROM ${OLLAMA_IMAGE} AS worker-ollama
COPY --from=build /src/bin/worker /usr/local/bin/sous-worker
COPY --from=build /src/bin/sousctl /usr/local/bin/sousctl
# The engine listens on loopback only: nothing outside the pod reaches it.
# Weights live on a volume mounted at OLLAMA_MODELS, never in the image.
# OLLAMA_NOPRUNE: several pods share the model volume; one starting up must not
# prune blobs that another pod (or the model-pull Job) is writing.
# HOME: ollama serve writes its key pair under $HOME/.ollama at start.
ENV SOUS_ENGINE=ollama \
    SOUS_ENGINE_EXEC="ollama serve" \
    SOUS_ENGINE_URL=http://127.0.0.1:11434 \
    OLLAMA_HOST=127.0.0.1:11434 \
    OLLAMA_MODELS=/models \
    OLLAMA_NOPRUNE=1 \
    HOME=/home/sous
RUN mkdir -p /models /home/sous && chown 65532:65532 /models /home/sous
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sous-worker"]
# The base image's CMD ["serve"] is for ollama; the worker takes no arguments.
CMD []

# The worker without cgo (make build-nocgo), for engine images older than
# bookworm's glibc: a static binary runs on any of them.
FROM build AS build-nocgo
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    make build-nocgo

# worker-vllm: vLLM's OpenAI server as the worker's child, on loopback.
#
#   docker build --target worker-vllm -t sous-worker-vllm .
#
# The model is a directory on the models volume; the overlay
# (deploy/k8s/overlays/vllm) names it in SOUS_ENGINE_EXEC and SOUS_MODEL
# (vLLM's --served-model-name). Slots come from vLLM's gauges
# (vllm:num_requests_running/waiting); vLLM sizes its own KV cache
# (--gpu-memory-utilization), so the worker needs no NVML.
FROM ${VLLM_IMAGE} AS worker-vllm
COPY --from=build-nocgo /src/bin/nocgo/worker /usr/local/bin/sous-worker
COPY --from=build-nocgo /src/bin/nocgo/sousctl /usr/local/bin/sousctl
ENV SOUS_ENGINE=openai \
    SOUS_ENGINE_URL=http://127.0.0.1:8000 \
    SOUS_ENGINE_EXEC="vllm serve /models/model --served-model-name model --host 127.0.0.1 --port 8000" \
    SOUS_MODEL=model \
    SOUS_ENGINE_START_TIMEOUT=15m \
    HOME=/home/sous \
    HF_HOME=/home/sous/.cache/huggingface \
    HF_HUB_OFFLINE=1
RUN mkdir -p /home/sous /models && chown 65532:65532 /home/sous /models
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sous-worker"]
# vLLM's own entrypoint is its server; the worker takes no arguments.
CMD [ ]

# worker-llamacpp: llama.cpp's server as the worker's child, on loopback
# (port 8090: the worker's own HTTP is 8080, llama-server's default).
#
#   docker build --target worker-llamacpp -t sous-worker-llamacpp .
#
# --metrics exposes llamacpp:requests_processing/deferred, the gauges the
# worker adapts its slots to; --parallel is the server's slots.
FROM ${LLAMACPP_IMAGE} AS worker-llamacpp
COPY --from=build-nocgo /src/bin/nocgo/worker /usr/local/bin/sous-worker
COPY --from=build-nocgo /src/bin/nocgo/sousctl /usr/local/bin/sousctl
ENV SOUS_ENGINE=openai \
    SOUS_ENGINE_URL=http://127.0.0.1:8090 \
    SOUS_ENGINE_EXEC="/app/llama-server --host 127.0.0.1 --port 8090 --metrics --parallel 8 --model /models/model.gguf --alias model" \
    SOUS_MODEL=model \
    SOUS_ENGINE_START_TIMEOUT=10m \
    HOME=/home/sous
RUN mkdir -p /home/sous /models && chown 65532:65532 /home/sous /models
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sous-worker"]
# llama.cpp's own entrypoint is its server; the worker takes no arguments.
CMD [ ]

# gateway: the OpenAI-compatible HTTP front door (cmd/gateway), CPU only.
#
#   docker build --target gateway -t sous-gateway .
#
# Built in the build stage's tree by the Makefile's own build-gateway target
# (the golang image has make). distroless base-nossl: glibc for the cgo build,
# CA certificates, no OpenSSL (Go brings its own TLS); the same Debian
# release as the worker image (deploy/gateway_test.go checks all this).
FROM build AS gateway-build
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    make build-gateway

FROM ${GATEWAY_BASE} AS gateway
COPY --from=gateway-build /src/bin/gateway /usr/local/bin/sous-gateway
USER 65532:65532
# 8081: the API (SOUS_GATEWAY_ADDR); 8082: /healthz, /readyz and /metrics
# (SOUS_HTTP_ADDR; the worker's are on 8080).
EXPOSE 8081 8082
ENTRYPOINT ["/usr/local/bin/sous-gateway"]

# scaler: the KEDA external scaler (cmd/scaler), CPU only; KEDA calls it on
# gRPC. Built like the gateway, by the Makefile's own build-scaler target, on
# the gateway's base (deploy/scaler_test.go checks it). A stage of its own
# from build, so BuildKit builds it beside gateway-build with the same Go
# build cache: only cmd/scaler and what it alone imports are compiled.
#
#   docker build --target scaler -t sous-scaler .
FROM build AS scaler-build
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    make build-scaler

FROM ${GATEWAY_BASE} AS scaler
COPY --from=scaler-build /src/bin/scaler /usr/local/bin/sous-scaler
USER 65532:65532
# 9090: KEDA's gRPC (SOUS_SCALER_ADDR); 8083: /healthz and /readyz
# (SOUS_HTTP_ADDR).
EXPOSE 9090 8083
ENTRYPOINT ["/usr/local/bin/sous-scaler"]
