#!/usr/bin/env bash
# Runs on the device tool's GPU machine (no Go, no RabbitMQ, no network),
# from the repository root, with .cache/gpu carried (make gpu-bundle):
# NVML through go-nvml and the sizing decision, then a private RabbitMQ on
# 127.0.0.1:5672 from the bundle and the dispatch comparisons. Each step is
# bounded; everything is also written to $OUT/gpu-device.log.
set -uo pipefail
B=$PWD/.cache/gpu
LOG=${OUT:-/tmp}/gpu-device.log
exec > >(tee "$LOG") 2>&1
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%T)"; }

step "machine"
nproc; free -g | head -2; uname -r
nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version --format=csv || true

step "NVML and the sizing decision (go-nvml, real device)"
"$B/gpucheck" -item-bytes $((1 << 30)) -slots 32                 # slots bind
"$B/gpucheck" -item-bytes $((64 << 30)) -slots 32                # GPU memory binds
"$B/gpucheck" -item-bytes $((1 << 30)) -reserve $((100 << 30)) -max 256 -slots 0  # reserve, no slot cap

step "RabbitMQ from the bundle"
[ -n "${GPU_NO_UNPACK:-}" ] || { tar -C / -xJf "$B/rabbitmq.tar.xz" && tar -C / -xJf "$B/libs.tar.xz"; }
PORT=${GPU_RMQ_PORT:-5672}
for l in libtinfo.so.6 libcrypto.so.3; do
  ldconfig -p | grep -q "$l" || export LD_LIBRARY_PATH=/opt/sous-gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
R=/tmp/rmq-$PORT
answers() { (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; }
answers || { rm -rf $R && mkdir -p $R; }
printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\nlog.console = false\n' "$PORT" > $R/rabbitmq.conf
echo '[].' > $R/enabled_plugins; : > $R/rabbitmq-env.conf
export PATH=/usr/lib/erlang/bin:/usr/lib/rabbitmq/bin:$PATH HOME=$R \
  RABBITMQ_NODENAME=sousgpu$PORT@localhost RABBITMQ_MNESIA_BASE=$R/mnesia RABBITMQ_LOG_BASE=$R/log \
  RABBITMQ_CONFIG_FILE=$R/rabbitmq RABBITMQ_ENABLED_PLUGINS_FILE=$R/enabled_plugins \
  RABBITMQ_CONF_ENV_FILE=$R/rabbitmq-env.conf RABBITMQ_PID_FILE=$R/node.pid ERL_EPMD_ADDRESS=127.0.0.1 \
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$PORT RABBITMQ_DIST_PORT=$((PORT + 20000)) ERL_CRASH_DUMP=$R/erl_crash.dump
answers || (setsid rabbitmq-server > $R/stdout.log 2>&1 &)
up=0
for _ in $(seq 1 90); do answers && { up=1; break; }; sleep 1; done
if [ $up = 0 ]; then echo "RabbitMQ did not start:"; tail -40 $R/stdout.log; tail -40 $R/log/*.log 2>/dev/null; exit 1; fi
echo "rabbitmq up after $SECONDS s"

step "comparisons"
[ -x /tmp/sous-ollama ] || xz -dc "$B/ollama.xz" > /tmp/sous-ollama && chmod +x /tmp/sous-ollama
export SOUS_OLLAMA_BIN=/tmp/sous-ollama RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$PORT/
cd integration/bench
bench() { # name benchtime seconds
  step "$1 $2"
  timeout "$3" "$B/bench.test" -test.run='^$' -test.count=1 -test.bench="$1" -test.benchtime="$2" || echo "($1: exit $?)"
}
for b in ${GPU_BENCHES:-MixedLengths:3200x:60 BrokerPath:10000x:80 LowLoadLatency:1000x:40 RealOllama:800x:80 GatewayAddedLatency:1000x:40 BrokerPath:10000x:80 RealOllama:800x:80 MixedLengths:3200x:60 BrokerPath:10000x:80 RealOllama:800x:80 Uniform:3200x:60}; do
  IFS=: read -r n t s <<<"$b"; bench "$n" "$t" "$s"
done
step "done"
