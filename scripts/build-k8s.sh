#!/usr/bin/env bash
# Builds the control plane the integration/k8s tests run into .cache/k8s/bin:
# etcd, kube-apiserver, kube-controller-manager, the KEDA operator and KEDA's
# metrics apiserver (keda-adapter), and helm, each from its Go module through a wrapper
# module under integration/k8s/tools (own go.mod each, so the project's
# go.mod never carries them). One binary at a time, at low priority; a
# binary is rebuilt only when it is missing or its wrapper module changed (a
# stamp holds the hash of its go.mod, go.sum and .go files). Each binary
# prints a line when it starts, one a minute while it compiles, and its time.
# Cold, measured on a shared 2-core machine (nice 19, other builds running):
# etcd 129 s, kube-apiserver 831 s, kube-controller-manager 155 s (shares
# most packages with the apiserver), keda-operator 553 s, keda-adapter 124 s
# (shares most with the operator): 30 min wall, 34 CPU-minutes, so about 17
# on 2 idle cores. helm (v3.21.4) on its own, cold: 323 s wall, 139 s user +
# 29 s system (shared 2-core machine, nice 15, two other builds running);
# about 9 s when only its link flags change. Seconds once built.
# On 2 idle cores (a fresh-clone CI run with an empty Go build cache,
# 2026-12-06, nice 0): etcd 37 s, kube-apiserver 185 s,
# kube-controller-manager 66 s, keda-operator 275 s, keda-adapter 46 s,
# helm 48 s, kube-scheduler 8 s, kubelet 19 s: 684 s in all.
#
# Then the node: kube-scheduler and the kubelet from tools/node, the same
# k8s.io/kubernetes release as the control plane, for the node tests
# (docs/design/kubelet.md). Measured on the shared 2-core machine (nice 15,
# another build running): kubelet 446 s cold for its own packages,
# kube-scheduler 94 s once the apiserver's and the kubelet's packages were
# cached; both share most packages with the control plane.
# `scripts/build-k8s.sh node` (make k8s-node) builds only those two.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools=$root/integration/k8s/tools
bin=$root/.cache/k8s/bin
mkdir -p "$bin"
exec 9>"$bin/.lock"
flock 9 # one build at a time, even from two shells

export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"

stamp() { (cd "$tools/$1" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-16); }

# build NAME MODULE PACKAGE [LDFLAGS]
build() {
  local name=$1 mod=$2 pkg=$3 ldflags=${4:-} want
  want=$(stamp "$mod")
  if [ -n "$ldflags" ]; then # a change of flags rebuilds too
    want=$(printf '%s %s' "$want" "$ldflags" | sha256sum | cut -c1-16)
  fi
  if [ -x "$bin/$name" ] && [ "$(cat "$bin/$name.stamp" 2>/dev/null)" = "$want" ]; then
    echo "k8s: $name is built ($bin/$name)"
    return
  fi
  echo "k8s: building $name from $pkg (module $mod; cold: minutes, see scripts/build-k8s.sh)"
  local start=$SECONDS
  # A line a minute while the compiler is silent, so a CI log shows the
  # build is alive and how far along it is.
  # Its sleep holds no copy of stdout and dies with it, so a pipe reading
  # this script's output closes as soon as the build ends.
  (
    trap 'kill "$s" 2>/dev/null; exit 0' TERM
    while :; do
      sleep 60 >/dev/null 2>&1 &
      s=$!
      wait "$s"
      echo "k8s: still building $name ($((SECONDS - start))s)"
    done
  ) &
  local ticker=$!
  if ! nice -n "${K8S_BUILD_NICE:-15}" go build -C "$tools/$mod" -trimpath -ldflags="$ldflags" -o "$bin/$name.tmp" "$pkg"; then
    kill "$ticker"
    echo "k8s: building $name failed" >&2
    exit 1
  fi
  kill "$ticker"
  mv "$bin/$name.tmp" "$bin/$name"
  echo "$want" > "$bin/$name.stamp"
  echo "k8s: built $name in $((SECONDS - start))s"
}

build_node() {
  build kube-scheduler node k8s.io/kubernetes/cmd/kube-scheduler
  build kubelet node k8s.io/kubernetes/cmd/kubelet
}

if [ "${1:-}" = node ]; then
  build_node
  echo "k8s: node built in ${SECONDS}s"
  exit 0
fi

build etcd controlplane ./etcd
build kube-apiserver controlplane k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager controlplane k8s.io/kubernetes/cmd/kube-controller-manager
build keda-operator keda github.com/kedacore/keda/v2/cmd/operator
build keda-adapter keda ./adapter
# helm's own Makefile sets its version and the Kubernetes version it
# assumes without a cluster (helm template, helm lint: the client-go minor,
# major + 1) at link time; without them helm says v3.21 and Kubernetes v1.20.
helm_ver=$(go list -C "$tools/helm" -m -f '{{.Version}}' helm.sh/helm/v3)
k8s_minor=$(go list -C "$tools/helm" -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
build helm helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$helm_ver \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"

# KEDA's CRDs, from the same module version as the operator.
crds=$root/.cache/k8s/keda-crds
kedadir=$(go list -C "$tools/keda" -m -f '{{.Dir}}' github.com/kedacore/keda/v2)
mkdir -p "$crds"
cp "$kedadir"/config/crd/bases/*.yaml "$crds/"
chmod u+w "$crds"/*.yaml
echo "k8s: KEDA CRDs in $crds"
build_node
echo "k8s: all built in ${SECONDS}s"
