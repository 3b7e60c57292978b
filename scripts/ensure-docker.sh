#!/usr/bin/env bash
# Makes sure a Docker engine answers, for the container tests and `make images`.
#
#   scripts/ensure-docker.sh          install docker.io if missing, start dockerd if none answers
#   scripts/ensure-docker.sh stop     stop the dockerd this script started (nothing else)
#
# The engine it starts has no iptables rules and no bridge network
# (`dockerd --iptables=false --bridge=none`): containers use `--network host`,
# so tests talk over loopback only and the machine's firewall is not touched.
# What it started is recorded in $SOUS_DOCKER_STATE (default /run/sous-docker),
# so `stop` ends that process and only that one. A DOCKER_HOST that is set, or
# an engine already answering on /var/run/docker.sock, is used as it is.
#
# Exit status: 0 when an engine answers; 1 when it cannot (the message says
# why and what to do).
set -euo pipefail

state=${SOUS_DOCKER_STATE:-/run/sous-docker}
sock=/var/run/docker.sock
log=$state/dockerd.log

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

stop() {
  if [ ! -f "$state/dockerd.pid" ]; then
    echo "docker: nothing to stop (this script started no dockerd)"
    return 0
  fi
  pid=$(cat "$state/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    echo "docker: stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "docker: dockerd (pid $pid) still running after 30s; sending SIGKILL" >&2
      kill -KILL "$pid" || true
    fi
  fi
  rm -f "$state/dockerd.pid"
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi

if [ -n "${DOCKER_HOST:-}" ]; then
  if answers; then
    echo "docker: DOCKER_HOST=$DOCKER_HOST answers"
    exit 0
  fi
  echo "docker: DOCKER_HOST=$DOCKER_HOST is set but no engine answers there; unset it to let this script start a local dockerd" >&2
  exit 1
fi

if command -v docker >/dev/null 2>&1 && answers; then
  echo "docker: engine answering on $sock ($(docker version --format '{{.Server.Version}}'))"
  exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<'MSG'
docker: no engine answers and dockerd is not installed. Install Docker
(Debian/Ubuntu: `sudo apt-get install docker.io`; elsewhere Docker Engine or
Docker Desktop), start it, and run again.
MSG
    exit 1
  fi
  echo "docker: installing docker.io (apt-get)"
  # The package's init script must not start a dockerd with a bridge and
  # iptables rules: policy-rc.d 101 tells invoke-rc.d to start nothing.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  trap '[ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends docker.io >/dev/null ||
    { apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null && apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends docker.io >/dev/null; }
fi

if [ "$(id -u)" != 0 ]; then
  echo "docker: no engine answers on $sock and starting dockerd needs root; start Docker yourself and run again" >&2
  exit 1
fi

mkdir -p "$state"
if [ -f "$state/dockerd.pid" ] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
  echo "docker: dockerd $(cat "$state/dockerd.pid") (started earlier by this script) does not answer; restarting it"
  stop
fi
echo "docker: starting dockerd (no iptables, no bridge; log $log)"
# setsid: dockerd outlives this script and the make that ran it, and a ^C in
# the terminal does not reach it. nice: image builds and test containers run
# under dockerd and share the machine with everything else.
setsid nice -n 10 dockerd --iptables=false --ip6tables=false --bridge=none \
  --host "unix://$sock" >"$log" 2>&1 </dev/null &
echo $! >"$state/dockerd.pid"
for _ in $(seq 1 120); do
  if answers; then
    echo "docker: up ($(docker info --format '{{.Driver}}') storage, engine $(docker version --format '{{.Server.Version}}'))"
    exit 0
  fi
  if ! kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
    echo "docker: dockerd exited at start; the end of $log:" >&2
    tail -n 20 "$log" >&2
    rm -f "$state/dockerd.pid"
    exit 1
  fi
  sleep 0.5
done
echo "docker: dockerd did not answer within 60s; see $log" >&2
exit 1
