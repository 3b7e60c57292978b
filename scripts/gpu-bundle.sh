#!/usr/bin/env bash
# make gpu-bundle: everything scripts/gpu-device.sh needs on a GPU machine
# that has no Go toolchain, no RabbitMQ and no network (the device tool's
# machines), built here into .cache/gpu (about 50 MiB, under the tool's
# 64 MiB): the gpucheck binary, the bench test binary, the dev Ollama, and
# this machine's Erlang and RabbitMQ with the two libraries they need that a
# minimal image may lack. Carry .cache/gpu and run scripts/gpu-device.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"
out=.cache/gpu
rm -rf "$out" && mkdir -p "$out"
go build -o "$out/gpucheck" ./cmd/gpucheck
go test -c -o "$out/bench.test" ./integration/bench
strip -o "$out/ollama" .cache/bin/ollama
xz -T2 -6 "$out/ollama"   # unpacked on the device
if command -v rabbitmq-server >/dev/null 2>&1 && [ -d /usr/lib/erlang ] && [ -d /usr/lib/rabbitmq ]; then
  libs=$(mktemp -d)
  trap 'rm -rf "$libs"' EXIT
  mkdir -p "$libs/opt/sous-gpu/lib"
  for l in libtinfo.so.6 libcrypto.so.3; do cp -L "/lib/x86_64-linux-gnu/$l" "$libs/opt/sous-gpu/lib/"; done
  # The broker's documentation, sources and the plugins a plain AMQP node
  # does not load stay behind.
  p=usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins
  tar -C / -cf - --exclude='usr/lib/erlang/man' --exclude='usr/lib/erlang/lib/*/src' \
      --exclude='usr/lib/erlang/lib/snmp-*' --exclude='usr/lib/erlang/lib/wx-*' \
      --exclude="$p/rabbitmq_web_*" --exclude="$p/rabbitmq_peer_discovery_*" --exclude="$p/rabbitmq_auth_*" \
      --exclude="$p/rabbitmq_mqtt-*" --exclude="$p/rabbitmq_stomp-*" --exclude="$p/rabbitmq_federation*" \
      --exclude="$p/rabbitmq_shovel*" --exclude="$p/rabbitmq_aws-*" --exclude="$p/rabbitmq_stream*" \
      --exclude="$p/rabbitmq_management*" --exclude="$p/rabbitmq_prometheus-*" --exclude="$p/rabbitmq_top-*" --exclude="$p/rabbitmq_tracing-*" --exclude="$p/eetcd-*" --exclude="$p/jose-*" \
      usr/lib/erlang usr/lib/rabbitmq \
    | xz -T2 -6 > "$out/rabbitmq.tar.xz"
  tar -C "$libs" -cJf "$out/libs.tar.xz" opt
fi
du -sh "$out" "$out"/*
