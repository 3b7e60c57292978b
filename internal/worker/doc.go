// Package worker is the sous runtime: it receives requests from a queue
// driver, decodes them, groups them into batches, runs the batches on an
// inference engine, publishes the results and settles each delivery.
//
// Guarantees: a delivery is acked only after its result was published and
// confirmed; a delivery whose result cannot be produced is requeued, and
// dead-lettered with a reason once it has used SOUS_MAX_ATTEMPTS attempts;
// bad input is dead-lettered at once with an error result and never stops
// the worker. The ack / requeue / dead-letter decision is made in one
// function, settle, which also recovers panics.
//
// Concurrency: Run owns three kinds of goroutine and waits for all of them:
// one receive loop, one dispatcher (which alone owns the batcher), and at
// most Config.Concurrency batch runners (each also settles its batch after
// the engine has answered). Deliveries in flight are bounded by Capacity,
// batch size × (Concurrency + 2): one batch forming, Concurrency batches on
// the engine, one batch's results being confirmed.
//
// Shutdown is staged: when Run's context is cancelled the receive loop stops
// and the driver requeues what it had prefetched; waiting items are
// requeued; running batches get Config.DrainTimeout to finish, after which
// their engine calls are cancelled and their deliveries requeued. Settling
// always runs on a context that outlives the cancellation.
package worker
