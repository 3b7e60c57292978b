#!/usr/bin/env bash
# Makes sure the programs the integration/k8s node tests run beside the
# kubelet are installed: containerd (and its ctr and runc shim), runc and
# the CNI plugins (only `loopback` is used; docs/design/kubelet.md). As root
# on Debian it installs Debian's containerd, runc and
# containernetworking-plugins, only when one is missing (docker.io already
# depends on the first two). The node tests start a private containerd of
# their own; the package's service, where an init system starts it, is
# left alone (a Docker engine may use it).
set -euo pipefail
need=(/usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 /usr/sbin/runc /usr/lib/cni/loopback)
missing() {
  local p
  for p in "${need[@]}"; do
    [ -x "$p" ] || return 0
  done
  return 1
}
if ! missing; then
  echo "node: $(containerd --version 2>&1 | head -1); $(runc --version 2>&1 | head -1); CNI plugins in /usr/lib/cni"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "node: installing Debian's containerd, runc and containernetworking-plugins"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends containerd runc containernetworking-plugins >/dev/null
  if missing; then
    echo "node: still missing after the install:" >&2
    for p in "${need[@]}"; do [ -x "$p" ] || echo "  $p" >&2; done
    exit 1
  fi
  echo "node: $(containerd --version 2>&1 | head -1); $(runc --version 2>&1 | head -1); CNI plugins in /usr/lib/cni"
  exit 0
fi
cat >&2 <<'MSG'
node: containerd, runc or the CNI plugins are missing. Install them (Debian/Ubuntu:
`sudo apt-get install containerd runc containernetworking-plugins`); the
integration/k8s node tests skip without them (and fail under CI=true).
MSG
exit 1
