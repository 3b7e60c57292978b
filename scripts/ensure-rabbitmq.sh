#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (or RABBITMQ_URL's
# host), starting the local rabbitmq-server if it is installed and down.
set -euo pipefail
host=127.0.0.1
port=5672
up() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
# The management API (port 15672) is what KEDA's rabbitmq scaler reads with
# protocol http; the scale-to-zero tests read it the same way.
enable_management() {
  if command -v rabbitmq-plugins >/dev/null 2>&1; then
    rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || echo "rabbitmq: could not enable rabbitmq_management" >&2
  fi
}
if up; then
  echo "rabbitmq: answering on $host:$port"
  [ -n "${RABBITMQ_URL:-}" ] || enable_management
  exit 0
fi
if [ -n "${RABBITMQ_URL:-}" ]; then
  echo "rabbitmq: RABBITMQ_URL is set; not starting a local broker"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  cat >&2 <<'MSG'
rabbitmq: nothing answers on 127.0.0.1:5672 and rabbitmq-server is not installed.
Install it (Debian/Ubuntu: `sudo apt-get install rabbitmq-server`), or point
RABBITMQ_URL / SOUS_AMQP_URL at a broker you run, or start one with Docker:
  docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management
MSG
  exit 1
fi
echo "rabbitmq: starting the local broker (rabbitmq-server -detached)"
rabbitmq-server -detached
for _ in $(seq 1 120); do
  if up; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    enable_management
    echo "rabbitmq: up"
    exit 0
  fi
  sleep 1
done
echo "rabbitmq: did not start within 120s; see /var/log/rabbitmq/" >&2
exit 1
