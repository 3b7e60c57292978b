#!/usr/bin/env bash
# Makes sure promtool and the Prometheus server are on PATH: promtool for
# deploy/monitoring_test.go (promtool check rules, promtool test rules), the
# server for integration/gateway's TestPrometheusScrapesDashboard. As root on
# Debian it installs Debian's prometheus package, which brings both.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "promtool: $(promtool --version 2>&1 | head -1)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "promtool: installing Debian's prometheus package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the server and promtool, not the node exporter
  # and the rest prometheus recommends.
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a Prometheus server where an init system runs it;
  # the tests start their own.
  command -v systemctl >/dev/null 2>&1 && systemctl disable --now prometheus >/dev/null 2>&1 || true
  echo "promtool: $(promtool --version 2>&1 | head -1)"
  exit 0
fi
cat >&2 <<'MSG'
promtool: not installed. Install Prometheus's promtool (Debian/Ubuntu:
`sudo apt-get install prometheus`, or a release from prometheus.io/download).
MSG
exit 1
