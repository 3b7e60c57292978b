// Package supervisor runs the inference engine as a child process of the
// worker, in the same container: no sidecar (SOUS_ENGINE_EXEC).
//
// It starts the engine, waits until it answers, preloads the model so the
// first batch does not pay for loading it, and reports ready only then. If
// the engine dies it is restarted with exponential backoff; the batch that
// was running fails with a retryable error and its deliveries are requeued
// by the worker. Stop sends SIGTERM to the engine's process group, waits,
// then SIGKILL.
//
// Concurrency: a Supervisor owns one goroutine, started by Start and waited
// for by Stop. Ready is safe for concurrent use. Stop is safe twice and
// before Start.
package supervisor
