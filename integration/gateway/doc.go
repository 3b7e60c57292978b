// Package gateway tests cmd/gateway end to end: the gateway and worker
// binaries (race-enabled), the real RabbitMQ, the dev Ollama with its tiny
// model, and a client nobody here wrote, the official `openai` npm package
// pinned in node/package-lock.json (installed with `npm ci` when
// node/node_modules is missing).
//
// TestPrometheusScrapesDashboard adds a real Prometheus (Debian's
// prometheus package, scripts/ensure-promtool.sh) scraping a worker and a
// gateway: every query of deploy/monitoring's dashboard returns data and
// every alert rule evaluates. Without the prometheus binary it skips, except
// with CI=true, where it fails.
package gateway
