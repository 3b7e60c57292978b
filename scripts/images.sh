#!/usr/bin/env bash
# make images: builds sous-worker:dev, sous-worker-ollama:dev,
# sous-gateway:dev and sous-scaler:dev from the Dockerfile, on stand-in base images built here from Debian packages (no
# registry is needed), plus the RabbitMQ image the container tests start.
# Prints the time of each step and the images' sizes.
#
# Stand-ins (deploy/README.md says how each differs from the real base):
#   sous-standin/debian:bookworm                   one debootstrap: minbase + the packages of all below
#   sous-standin/golang:<go>-bookworm              GO_IMAGE      that + this machine's Go toolchain
#   sous-standin/distroless-base-debian12:nonroot  WORKER_BASE   the files of distroless/base's packages
#                                                  GATEWAY_BASE  (base-nossl's, plus libssl3: a superset;
#                                                                 the gateway's and the scaler's)
#   sous-standin/ollama:dev                        OLLAMA_IMAGE  that + the dev Ollama + the tiny model
#   sous-standin/rabbitmq:bookworm                 (tests)       that, running Debian's rabbitmq-server
# Each carries a label with the hash of its inputs and is rebuilt only when
# missing or when that hash changes; docker keeps them between runs.
#
# Environment: OLLAMA_BIN (default $SOUS_OLLAMA_BIN, else .cache/bin/ollama),
# SOUS_DEBIAN_MIRROR (default: the bookworm mirror of this machine's apt
# sources), SOUS_WORKER_IMAGE, SOUS_WORKER_OLLAMA_IMAGE, SOUS_GATEWAY_IMAGE,
# SOUS_SCALER_IMAGE (the tags built).
# Needs root for debootstrap (first run only) and a Docker engine with
# BuildKit (scripts/ensure-docker.sh starts one).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

OLLAMA_BIN=${OLLAMA_BIN:-${SOUS_OLLAMA_BIN:-$repo/.cache/bin/ollama}}
worker_tag=${SOUS_WORKER_IMAGE:-sous-worker:dev}
ollama_tag=${SOUS_WORKER_OLLAMA_IMAGE:-sous-worker-ollama:dev}
gateway_tag=${SOUS_GATEWAY_IMAGE:-sous-gateway:dev}
scaler_tag=${SOUS_SCALER_IMAGE:-sous-scaler:dev}
suite=bookworm
# Bump when a stand-in's recipe below changes, so that cached images are rebuilt.
recipe=1
go_version=$(go env GOVERSION)
go_version=${go_version#go}
goroot=$(go env GOROOT)

debian_img=sous-standin/debian:$suite
go_img=sous-standin/golang:$go_version-$suite
base_img=sous-standin/distroless-base-debian12:nonroot
ollama_img=sous-standin/ollama:dev
rabbit_img=sous-standin/rabbitmq:$suite
label=run.sous.standin

work=$repo/.cache/standin
tmp=
proxy_pid=
cleanup() {
  [ -z "$proxy_pid" ] || { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }
  [ -z "$tmp" ] || rm -rf "$tmp"
}
trap cleanup EXIT

total0=$(date +%s%N)
# step NAME CMD...: runs CMD and prints how long it took.
step() {
  local name=$1 t0 t1
  shift
  t0=$(date +%s%N)
  "$@"
  t1=$(date +%s%N)
  printf '== %-52s %7.1fs\n' "$name" "$(((t1 - t0) / 1000000))e-3"
}

# The docker CLI to build with: BuildKit is needed (RUN --mount). Docker 23+
# CLIs build through the buildx plugin; older ones (Debian's docker.io 20.10)
# talk to the engine's built-in BuildKit themselves.
pick_docker() {
  local d major
  for d in docker /usr/bin/docker; do
    command -v "$d" >/dev/null 2>&1 || continue
    if "$d" buildx version >/dev/null 2>&1; then echo "$d"; return; fi
    major=$("$d" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then echo "$d"; return; fi
  done
  echo "images: no docker CLI here can build with BuildKit; install the buildx plugin (Debian: docker-buildx) or Debian's docker.io" >&2
  exit 1
}

# mirror prints the Debian mirror this machine's apt already uses for
# $suite (deb822 .sources or one-line sources.list), or SOUS_DEBIAN_MIRROR.
mirror() {
  if [ -n "${SOUS_DEBIAN_MIRROR:-}" ]; then echo "$SOUS_DEBIAN_MIRROR"; return; fi
  local m codename
  codename=$(. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true
  for s in "$suite" ${codename:+"$codename"}; do
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$s" '
      BEGIN { RS = ""; FS = "\n" }
      {
        t = ""; u = ""; su = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) t = $i
          else if ($i ~ /^URIs:/) u = $i
          else if ($i ~ /^Suites:/) su = $i
          else if ($i ~ /^Enabled:[ \t]*no/) t = ""
        }
        sub(/^URIs:[ \t]*/, "", u)
        if (t ~ /[ \t]deb([ \t]|$)/ && (su " ") ~ ("[ \t]" suite "[ \t]")) { split(u, a, /[ \t]+/); print a[1]; exit }
      }')
    [ -n "$m" ] || m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$s" '
      $1 == "deb" {
        i = 2
        if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == suite) { print $i; exit }
      }')
    if [ -n "$m" ]; then echo "$m"; return; fi
  done
  echo "images: no Debian $suite mirror in /etc/apt/sources.list*; set SOUS_DEBIAN_MIRROR (e.g. a Debian mirror URL)" >&2
  exit 1
}

# key prints a hash of a stand-in's inputs: the recipe version and its args.
key() { printf '%s\n' "$recipe" "$@" | sha256sum | cut -c1-16; }

# fresh IMAGE KEY: the image exists and was built from the same inputs.
fresh() { [ "$($docker image inspect --format "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null)" = "$2" ]; }

# rootfs DIR PACKAGES: a minimal Debian $suite in DIR, with PACKAGES.
rootfs() {
  if [ "$(id -u)" != 0 ]; then
    echo "images: building the stand-in bases needs root (debootstrap); run as root once, later runs reuse them" >&2
    exit 1
  fi
  command -v debootstrap >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends debootstrap >/dev/null
  local m
  m=$(mirror)
  mkdir -p "$work/debs"
  if ! nice -n 10 debootstrap --variant=minbase --include="$2" --cache-dir="$work/debs" \
    "$suite" "$1" "$m" >"$1.log" 2>&1; then
    echo "images: debootstrap failed; the end of its log:" >&2
    tail -n 20 "$1.log" >&2
    exit 1
  fi
  # What a container image does not need: apt's lists and caches.
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*
}

# import DIR IMAGE KEY CHANGES...: DIR as a one-layer image.
import() {
  local dir=$1 img=$2 k=$3 args=()
  shift 3
  for c in "$@"; do args+=(--change "$c"); done
  tar -C "$dir" --numeric-owner -cf - . |
    nice -n 10 "$docker" import "${args[@]}" --change "LABEL $label=$k" - "$img" >/dev/null
}

# One debootstrap makes every stand-in: on a shared machine each debootstrap
# costs minutes, so the packages of all of them go into one Debian tree.
debian_pkgs=ca-certificates,tzdata,netbase,gcc,libc6-dev,make,pkg-config,rabbitmq-server
debian_key=$(key debian "$suite" "$debian_pkgs")
base_key=$(key base "$debian_key")
standin_debian() {
  fresh "$debian_img" "$debian_key" && fresh "$base_img" "$base_key" && return
  local r=$tmp/debian
  rootfs "$r" "$debian_pkgs"
  import "$r" "$debian_img" "$debian_key" 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'CMD ["bash"]'
  # distroless/base-debian12's packages (base-files, netbase, tzdata, libc6,
  # libssl3, the CA bundle), their files only: no shell, no package manager.
  local d=$tmp/distroless
  mkdir -p "$d"/usr/bin "$d"/usr/sbin "$d"/usr/lib "$d"/usr/lib64 "$d"/etc/ssl/certs "$d"/home/nonroot "$d"/tmp "$d"/root
  for l in bin sbin lib lib64; do ln -s "usr/$l" "$d/$l"; done
  dpkg-query --admindir="$r/var/lib/dpkg" -L base-files netbase tzdata libc6 libssl3 |
    grep '^/.' | sed 's|^/||' | sort -u |
    tar -C "$r" --no-recursion -cf - -T - | tar -C "$d" --keep-directory-symlink -xf -
  cp "$r"/etc/ssl/certs/ca-certificates.crt "$d"/etc/ssl/certs/
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$d"/etc/passwd
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\ntty:x:5:\nstaff:x:50:\n' >"$d"/etc/group
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$d"/etc/nsswitch.conf
  chown 65532:65532 "$d"/home/nonroot
  chmod 0700 "$d"/home/nonroot "$d"/root
  chmod 1777 "$d"/tmp
  import "$d" "$base_img" "$base_key" \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    'USER 65532' 'WORKDIR /home/nonroot'
  rm -rf "$r" "$d"
}

# dockerbuild IMAGE KEY DIR: builds DIR's Dockerfile (stand-ins layered on
# $debian_img; no network is used).
dockerbuild() {
  echo "LABEL $label=$2" >>"$3/Dockerfile"
  DOCKER_BUILDKIT=1 nice -n 10 "$docker" build -q --network host -t "$1" "$3" >/dev/null
}

go_key=$(key go "$debian_key" "$go_version")
standin_go() {
  fresh "$go_img" "$go_key" && return
  # The official image: buildpack-deps:bookworm-scm plus gcc, libc6-dev, make,
  # pkg-config and Go in /usr/local/go; GOPATH /go; GOTOOLCHAIN local.
  local c=$tmp/golang
  mkdir -p "$c"
  cp -a "$goroot" "$c/go"
  cat >"$c/Dockerfile" <<EOF
FROM $debian_img
COPY go /usr/local/go
ENV GOLANG_VERSION=$go_version GOTOOLCHAIN=local GOPATH=/go
ENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /go/src /go/bin && chmod -R 1777 /go
WORKDIR /go
EOF
  dockerbuild "$go_img" "$go_key" "$c"
  rm -rf "$c"
}

rabbit_key=$(key rabbitmq "$debian_key" 2)
standin_rabbitmq() {
  fresh "$rabbit_img" "$rabbit_key" && return
  local c=$tmp/rabbitmq
  mkdir -p "$c"
  # Debian's rabbitmq-server, logging to stdout (testcontainers waits on the
  # log). The node's name, ports and epmd port come from the test: containers
  # share the host's network.
  cat >"$c/Dockerfile" <<EOF
FROM $debian_img
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
RUN mkdir -p /var/log/rabbitmq && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
USER rabbitmq
WORKDIR /var/lib/rabbitmq
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
EOF
  dockerbuild "$rabbit_img" "$rabbit_key" "$c"
}

# The tiny model (internal/tinymodel), created by the dev Ollama as
# integration/ollamatest does, into $tmp/ollama/models.
tiny_model() {
  local out=$tmp/ollama line=
  mkdir -p "$out"
  go build -o "$tmp/devollama" ./cmd/devollama
  SOUS_OLLAMA_BIN=$OLLAMA_BIN "$tmp/devollama" -dir "$out/dev" >"$tmp/devollama.out" 2>"$tmp/devollama.err" &
  local pid=$!
  for _ in $(seq 1 240); do
    line=$(grep -s '^OLLAMA_URL=' "$tmp/devollama.out" || true)
    [ -z "$line" ] || break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -z "$line" ]; then
    echo "images: the dev Ollama did not create the tiny model:" >&2
    tail -n 20 "$tmp/devollama.err" >&2
    exit 1
  fi
  mv "$out/dev/models" "$out/models"
  chmod -R a+rX "$out/models"
}

standin_ollama() {
  if [ ! -x "$OLLAMA_BIN" ]; then
    echo "images: no ollama binary at $OLLAMA_BIN; run \`make ollama\` or set OLLAMA_BIN" >&2
    exit 1
  fi
  local k
  k=$(key ollama "$debian_key" "$(sha256sum "$OLLAMA_BIN" | cut -c1-64)" \
    "$(cat internal/tinymodel/*.go integration/ollamatest/ollamatest.go | sha256sum | cut -c1-64)")
  fresh "$ollama_img" "$k" && return
  tiny_model
  cp "$OLLAMA_BIN" "$tmp/ollama/ollama"
  # As the official image: the binary at /usr/bin/ollama, ENTRYPOINT ollama,
  # CMD serve, listening on all interfaces unless OLLAMA_HOST says otherwise.
  cat >"$tmp/ollama/Dockerfile" <<EOF
FROM $debian_img
COPY ollama /usr/bin/ollama
COPY models /models
ENV OLLAMA_HOST=0.0.0.0:11434
EXPOSE 11434
ENTRYPOINT ["/usr/bin/ollama"]
CMD ["serve"]
EOF
  dockerbuild "$ollama_img" "$k" "$tmp/ollama"
  rm -rf "$tmp/ollama"
}

# A loopback Go module proxy over this machine's module cache: the build
# stage downloads go.mod's modules from it. A fixed port keeps the build
# argument, and so BuildKit's cache of the go mod download step, stable.
modproxy() {
  go mod download
  go build -o "$tmp/modproxy" ./scripts/modproxy
  local addr=127.0.0.1:${SOUS_MODPROXY_PORT:-38417} line=
  for attempt in 1 2; do
    "$tmp/modproxy" -dir "$(go env GOMODCACHE)/cache/download" -addr "$addr" >"$tmp/modproxy.out" 2>"$tmp/modproxy.err" &
    proxy_pid=$!
    for _ in $(seq 1 50); do
      line=$(grep -s '^GOPROXY=' "$tmp/modproxy.out" || true)
      [ -z "$line" ] || break
      kill -0 "$proxy_pid" 2>/dev/null || break
      sleep 0.1
    done
    [ -z "$line" ] || break
    wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=
    addr=127.0.0.1:0 # the fixed port is taken: any port, at the price of the cache
  done
  if [ -z "$line" ]; then
    cat "$tmp/modproxy.err" >&2
    exit 1
  fi
  goproxy=${line#GOPROXY=}
}

build() {
  DOCKER_BUILDKIT=1 nice -n 10 "$docker" build -q --network host \
    --build-arg GO_IMAGE="$go_img" --build-arg WORKER_BASE="$base_img" \
    --build-arg OLLAMA_IMAGE="$ollama_img" --build-arg GATEWAY_BASE="$base_img" \
    --build-arg GOPROXY="$goproxy" \
    --target "$1" -t "$2" . >/dev/null
}

# One build at a time: test packages that find the images missing run this
# script too, possibly at once.
mkdir -p "$work"
exec 9>"$work/lock"
flock 9

step "docker engine (scripts/ensure-docker.sh)" scripts/ensure-docker.sh
docker=$(pick_docker)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sous-images.XXXXXX")
step "stand-in $debian_img, $base_img" standin_debian
step "stand-in $go_img" standin_go
step "stand-in $ollama_img" standin_ollama
step "stand-in $rabbit_img" standin_rabbitmq
step "module proxy on loopback" modproxy
step "docker build --target worker -> $worker_tag" build worker "$worker_tag"
step "docker build --target worker-ollama -> $ollama_tag" build worker-ollama "$ollama_tag"
step "docker build --target gateway -> $gateway_tag" build gateway "$gateway_tag"
step "docker build --target scaler -> $scaler_tag" build scaler "$scaler_tag"
total1=$(date +%s%N)
printf '== %-52s %7.1fs\n' "total" "$(((total1 - total0) / 1000000))e-3"

echo "== image sizes"
for img in "$worker_tag" "$ollama_tag" "$gateway_tag" "$scaler_tag" "$base_img" "$ollama_img" "$go_img" "$rabbit_img"; do
  printf '   %-52s %6d MB\n' "$img" "$(($("$docker" image inspect --format '{{.Size}}' "$img") / 1000000))"
done
