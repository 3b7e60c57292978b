#!/usr/bin/env bash
# scripts/build-tools.sh NAME...: builds the test tools under tools/ into
# .cache/tools/bin, each from its Go module through a wrapper module with a
# `tool` directive (tools/NAME/go.mod; its own module, so the project's
# go.mod never carries them):
#   registry    the CNCF distribution registry (deploy's `make push` test)
#   actionlint  the GitHub Actions linter (deploy's release workflow test)
# A binary is rebuilt only when missing or when its go.mod or go.sum changed
# (a stamp holds their hash). Prints the path of each binary on stdout, the
# rest on stderr. Cold on a shared 2-core machine: registry about 3 min,
# actionlint under 1 min; milliseconds once built.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/.cache/tools/bin
mkdir -p "$bin"
exec 9>"$bin/.lock"
flock 9 # one build at a time, even from two test packages

for name in "$@"; do
  mod=$root/tools/$name
  if [ ! -f "$mod/go.mod" ]; then
    echo "build-tools: no module tools/$name" >&2
    exit 2
  fi
  want=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)
  if ! [ -x "$bin/$name" ] || [ "$(cat "$bin/$name.stamp" 2>/dev/null)" != "$want" ]; then
    pkg=$(awk '$1 == "tool" { print $2; exit }' "$mod/go.mod")
    echo "build-tools: building $name from $pkg (cold: minutes)" >&2
    start=$SECONDS
    nice -n "${TOOLS_BUILD_NICE:-15}" go build -C "$mod" -trimpath -o "$bin/$name.tmp" "$pkg" >&2
    mv "$bin/$name.tmp" "$bin/$name"
    echo "$want" >"$bin/$name.stamp"
    echo "build-tools: built $name in $((SECONDS - start))s" >&2
  fi
  echo "$bin/$name"
done
