// Package bench holds sous's benchmarks against a real RabbitMQ (and, for
// the real-engine comparison, a real Ollama with the tiny model). Each
// benchmark runs the designs it compares side by side in one run, so their
// ratio is meaningful on a noisy machine; `make bench` runs them and
// docs/benchmarks.md records the figures with the command.
//
// b.N is the number of requests: every iteration count works, so CI can
// run them for a few iterations only to prove they work.
package bench
