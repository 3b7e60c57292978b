#!/usr/bin/env bash
# make push REGISTRY=... [TAG=...] [PLATFORMS=...] [BASES=real|standin]:
# builds the Dockerfile's images and pushes them to any OCI registry, then
# prints one line per image on stdout, REGISTRY/NAME@sha256:... (the digest
# of its image index); everything else goes to stderr.
#
#   sous-worker         --target worker
#   sous-worker-ollama  --target worker-ollama
#   sous-gateway        --target gateway
#   sous-scaler         --target scaler (pushed whenever the Dockerfile has
#                       that stage)
#
# Each platform is built on its own (docker build --platform) and pushed as
# NAME:TAG-ARCH; then NAME:TAG is made an image index of those
# (docker manifest create/push), one platform or several, so a cluster of any
# of them pulls NAME:TAG. The same path runs with the classic builder, BuildKit
# or buildx's docker driver; no buildx builder is needed.
#
# REGISTRY   required: host[:port][/namespace], e.g. ghcr.io/OWNER
# TAG        default: the tag the manifests use (deploy/k8s/images)
# PLATFORMS  default: linux/amd64,linux/arm64 with BASES=real; this machine's
#            platform with BASES=standin
# BASES      real (default): the Dockerfile's pinned bases, pulled from their
#            registries. standin: scripts/images.sh's stand-ins built here from
#            Debian packages (no registry but REGISTRY needed; what the test
#            pushes). Stand-ins exist for this machine's architecture only.
#
# A platform other than this machine's runs under QEMU through binfmt_misc
# (the build stage compiles with cgo, so it runs on the target platform);
# without a handler registered this script stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "push: $*" >&2; exit 1; }

[ -n "${REGISTRY:-}" ] || die "set REGISTRY, e.g. make push REGISTRY=ghcr.io/OWNER"
REGISTRY=${REGISTRY%/}
BASES=${BASES:-real}
TAG=${TAG:-$(awk '$1 == "newTag:" { print $2; exit }' deploy/k8s/images/kustomization.yaml)}
[ -n "$TAG" ] || die "no TAG given and none found in deploy/k8s/images/kustomization.yaml"

case $(uname -m) in
x86_64 | amd64) native=amd64 ;;
aarch64 | arm64) native=arm64 ;;
*) native=$(uname -m) ;;
esac

case $BASES in
real) PLATFORMS=${PLATFORMS:-linux/amd64,linux/arm64} ;;
standin) PLATFORMS=${PLATFORMS:-linux/$native} ;;
*) die "BASES=$BASES: want real or standin" ;;
esac

images=(sous-worker:worker sous-worker-ollama:worker-ollama sous-gateway:gateway)
# The scaler's hook: its image is pushed as soon as the Dockerfile builds it.
if grep -qiE '^FROM .* AS scaler$' Dockerfile; then
  images+=(sous-scaler:scaler)
fi

# Check every platform before building anything: a platform that cannot be
# built here is said plainly, never skipped in silence.
IFS=, read -r -a platforms <<<"$PLATFORMS"
for p in "${platforms[@]}"; do
  arch=${p#linux/}
  [ "$p" != "$arch" ] || die "platform $p: only linux/ARCH platforms are built"
  [ "$arch" != "$native" ] || continue
  if [ "$BASES" = standin ]; then
    die "$p cannot be built here with BASES=standin: the stand-in bases are built by debootstrap for this machine's architecture ($native) only, from its Debian packages. Build $p with BASES=real on a machine that can pull the real bases (the release workflow does), or set PLATFORMS=linux/$native"
  fi
  qemu=$arch
  [ "$arch" != arm64 ] || qemu=aarch64
  [ "$arch" != amd64 ] || qemu=x86_64
  if ! [ -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ]; then
    die "$p cannot be built on this $native machine: no binfmt_misc handler for $qemu binaries (/proc/sys/fs/binfmt_misc/qemu-$qemu), and the build stage runs on the target platform. Register QEMU (Debian: apt-get install qemu-user-static binfmt-support; GitHub Actions: docker/setup-qemu-action), or set PLATFORMS=linux/$native"
  fi
done

docker=docker
# Plain manifests, not buildx's default provenance attestation (which turns a
# single-platform push into an index that `docker manifest create` refuses);
# the release workflow attests provenance itself.
export BUILDX_NO_DEFAULT_ATTESTATIONS=1 DOCKER_BUILDKIT=1

# `docker manifest` talks to the registry itself, and only over TLS unless
# told otherwise; the engine already treats 127.0.0.0/8 as insecure.
insecure=()
case $REGISTRY in
127.* | localhost | localhost:* | \[::1\]*) insecure=(--insecure) ;;
esac

if [ "$BASES" = standin ]; then
  echo "push: BASES=standin: building the images on the stand-in bases (scripts/images.sh)" >&2
  scripts/images.sh >&2
fi

# build TARGET PLATFORM REF: REF, built for PLATFORM.
build() {
  if [ "$BASES" = standin ]; then
    # images.sh built the native platform's images: retag them.
    local dev
    case $1 in
    worker) dev=${SOUS_WORKER_IMAGE:-sous-worker:dev} ;;
    worker-ollama) dev=${SOUS_WORKER_OLLAMA_IMAGE:-sous-worker-ollama:dev} ;;
    gateway) dev=${SOUS_GATEWAY_IMAGE:-sous-gateway:dev} ;;
    scaler) dev=${SOUS_SCALER_IMAGE:-sous-scaler:dev} ;;
    *) die "BASES=standin: scripts/images.sh does not build the $1 target" ;;
    esac
    "$docker" tag "$dev" "$3"
    return
  fi
  "$docker" build --platform "$2" --target "$1" -t "$3" . >&2
}

digests=()
for entry in "${images[@]}"; do
  name=${entry%%:*} target=${entry#*:}
  ref=$REGISTRY/$name:$TAG
  parts=()
  for p in "${platforms[@]}"; do
    arch=${p#linux/}
    t0=$SECONDS
    echo "push: building $name for $p (--target $target)" >&2
    build "$target" "$p" "$ref-$arch"
    echo "push: built $name for $p in $((SECONDS - t0))s; pushing $ref-$arch" >&2
    "$docker" push "$ref-$arch" >&2
    parts+=("$ref-$arch")
  done
  "$docker" manifest rm "$ref" >/dev/null 2>&1 || true # a local list left by an earlier run
  "$docker" manifest create "${insecure[@]}" "$ref" "${parts[@]}" >&2
  for i in "${!platforms[@]}"; do
    "$docker" manifest annotate --os linux --arch "${platforms[i]#linux/}" "$ref" "${parts[i]}" >&2
  done
  digest=$("$docker" manifest push "${insecure[@]}" --purge "$ref" | grep -o 'sha256:[0-9a-f]\{64\}' | tail -n 1)
  [ -n "$digest" ] || die "docker manifest push $ref printed no digest"
  digests+=("$REGISTRY/$name@$digest")
done

printf '%s\n' "${digests[@]}"
