// Package integration holds the end-to-end tests of sous: the real worker
// and sousctl binaries, a real RabbitMQ (RABBITMQ_URL, default the local
// broker on 127.0.0.1:5672) and a real Ollama server with a tiny model made
// by the tests (integration/ollamatest). Each test uses its own queues, so
// tests run in parallel against one broker.
//
// Tests that must prove an answer (agent_test.go: the tool-calling loop on
// both engines, stream reassembly, no mix-ups across a batch, redelivery)
// use the scripted model, whose answers are tinymodel's constants; the
// others use the random one.
package integration
