// Package reliability attacks the real worker binary the way production
// will and checks that nothing is lost and no one gets in: network faults
// between worker and broker (an in-process toxiproxy on loopback), a
// private RabbitMQ node stopped, killed and restarted under load, the worker
// SIGKILLed in a loop, engines that die, hang or outlast the broker's
// consumer_timeout, SIGTERM under load, a soak with memory and goroutines
// sampled, a corpus of hostile messages, TLS with a CA and client
// certificates, and secrets that must never leak.
//
// Tests that only need a broker use the shared one (RABBITMQ_URL, default
// 127.0.0.1:5672) with their own queues; tests that break, restart or
// reconfigure a broker start a private node of their own (rabbitmq-server
// with its own node name, ports and data directory) and always stop it.
// The engine is a fake Ollama served by the test (fast, slow, hanging or
// failing on demand) except where the real Ollama is the point
// (integration/ollamatest).
//
// Every test is bounded in time and stops by itself. Figures that
// docs/reliability.md records are logged as "FIGURE name=value" lines
// (go test -v). The long soak runs only with SOUS_SOAK=1; a short one runs
// always.
package reliability
