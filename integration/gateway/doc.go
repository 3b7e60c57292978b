// Package gateway tests cmd/gateway end to end: the gateway and worker
// binaries (race-enabled), the real RabbitMQ, the dev Ollama with its tiny
// model, and a client nobody here wrote, the official `openai` npm package
// pinned in node/package-lock.json (installed with `npm ci` when
// node/node_modules is missing).
package gateway
