#!/usr/bin/env bash
# make gpu-check: on a machine with an NVIDIA GPU, read NVML through the
# real go-nvml path, print the sizing decision for a per-request estimate,
# then run the continuous-dispatch comparisons (mixed answer lengths, and
# the broker path against a hand-written worker) where a RabbitMQ server is
# installed. Each step prints its time. Exits non-zero when NVML cannot be
# read: the point of the check is the real device.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"
ITEM_BYTES="${ITEM_BYTES:-1073741824}"   # 1 GiB a request: 8 GiB of KV for 32 requests of 2k tokens at 128 KiB/token
SLOTS="${SLOTS:-32}"

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%T)"; }

step "NVML and the sizing decision"
t0=$SECONDS
nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv 2>/dev/null || echo "(nvidia-smi not found; reading NVML directly)"
go run ./cmd/gpucheck -item-bytes "$ITEM_BYTES" -slots "$SLOTS"
go run ./cmd/gpucheck -item-bytes "$((ITEM_BYTES * 64))" -slots "$SLOTS"   # memory binds
echo "took $((SECONDS - t0)) s"

step "comparisons 1 and 4 (mixed lengths; broker path vs a hand-written worker)"
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "SKIPPED: rabbitmq-server is not installed on this machine, and the comparisons run through a real broker"
  exit 0
fi
scripts/ensure-rabbitmq.sh
t0=$SECONDS
go test -run='^$' -count=1 -bench='MixedLengths|BrokerPath' -benchtime="${BENCHTIME:-2000x}" ./integration/bench
echo "took $((SECONDS - t0)) s"
