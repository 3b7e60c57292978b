#!/usr/bin/env bash
# make demo: the worker processing real prompts end to end, on this machine.
# Starts the dev Ollama (the tiny random-weight model, whose answers are
# gibberish by design, and the scripted model, whose answers are known) and
# the worker, publishes prompts with sousctl, prints the results, then stops
# what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
# BIN_DIR holds worker and sousctl (make build puts them in bin/); the demo
# builds devollama and demoqueues there too.
bin="${BIN_DIR:-bin}"
tmp=$(mktemp -d)
pids=()
made=() # the queues this run declared (they did not exist before it)
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${#made[@]}" -gt 0 ]; then
    echo "== removing the queues the demo made (its dead letters included)"
    "$bin/demoqueues" delete "${made[@]}" || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

export SOUS_OLLAMA_BIN="${SOUS_OLLAMA_BIN:-$PWD/.cache/bin/ollama}"
go build -o "$bin/" ./cmd/devollama ./scripts/demoqueues
echo "== starting the dev Ollama (tiny model)"
"$bin/devollama" >"$tmp/ollama.out" 2>"$tmp/ollama.err" &
pids+=($!)
for _ in $(seq 1 240); do
  grep -q '^OLLAMA_URL=' "$tmp/ollama.out" && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then cat "$tmp/ollama.err" >&2; exit 1; fi
  sleep 0.5
done
line=$(grep '^OLLAMA_URL=' "$tmp/ollama.out") || { echo "dev Ollama did not start:" >&2; cat "$tmp/ollama.err" >&2; exit 1; }
url=$(sed -E 's/^OLLAMA_URL=([^ ]+).*/\1/' <<<"$line")
echo "   $line"

export SOUS_QUEUE="${SOUS_QUEUE:-sous.demo.requests}" SOUS_RESULTS_QUEUE="${SOUS_RESULTS_QUEUE:-sous.demo.results}"
mapfile -t made < <("$bin/demoqueues" missing "$SOUS_QUEUE" "$SOUS_QUEUE.dlq" "$SOUS_RESULTS_QUEUE")
echo "== starting the worker on queue $SOUS_QUEUE"
SOUS_ENGINE_URL="$url" SOUS_MODEL=tiny SOUS_MODELS_ALLOWED=tiny,tiny-scripted SOUS_HTTP_ADDR=127.0.0.1:0 SOUS_LOG_FORMAT=text \
  SOUS_MAX_NUM_PREDICT=24 SOUS_WORKER_ID=demo "$bin/worker" >"$tmp/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  grep -q 'ready to work' "$tmp/worker.log" && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then cat "$tmp/worker.log" >&2; exit 1; fi
  sleep 0.5
done

echo "== sousctl publish: three prompts at once: each is an engine call of its own (batch ... of 1), run side by side in the engine's slots"
"$bin/sousctl" publish "Why is the sky blue?" "Write a haiku about queues" "Name three GPUs"
echo
echo "== sousctl publish -chat -stream: one chat message, streamed"
"$bin/sousctl" publish -chat -stream "Tell me a story"
echo
echo "== the scripted model (exact answers): a question answered in plain words"
"$bin/sousctl" publish -model tiny-scripted "Why is the sky blue?"
echo
echo "== the agent loop: the model calls get_weather, sousctl answers it, the model answers"
cat >"$tmp/tools.json" <<'JSON'
[{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
  "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
JSON
"$bin/sousctl" publish -model tiny-scripted -tools "$tmp/tools.json" -tool-answer get_weather=sunny "What is the weather in Paris?"
echo
echo "== a bad request is dead-lettered with a reason and answered with an error"
echo '{"prompt":"x","options":{"num_predict":"many"}}' | "$bin/sousctl" publish -f - || true
echo
echo "== worker log (last lines)"
tail -n 8 "$tmp/worker.log"
