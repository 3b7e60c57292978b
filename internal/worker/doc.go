// Package worker is the sous runtime: it receives requests from a queue
// driver, decodes them, keeps the inference engine full with them, publishes
// the results and settles each delivery.
//
// Dispatch is continuous: the unit is a request in flight, not a batch.
// Engines that take one request per call batch continuously inside, so each
// such request goes to the engine alone the moment the in-flight limit
// (Sizer.Size: the engine's slots, free GPU memory, the AIMD ceiling) has
// room, oldest work first across keys. Where the API takes a list in one
// call (embeddings, /v1/completions prompt lists; the engine says so with
// TakesList), requests of one key are coalesced into a list within
// Config.BatchWait while the engine is busy.
//
// Guarantees: a delivery is acked only after its result was published and
// confirmed; a delivery whose result cannot be produced is requeued, and
// dead-lettered with a reason once it has used Config.MaxAttempts attempts;
// bad input is dead-lettered at once with an error result and never stops
// the worker; it is settled beside the receive loop, so it never holds back
// the valid requests received with it. A dead-letter the broker refuses (a
// dead-letter queue missing or full) is the worker's fault: the request
// goes back to the queue at once with no attempt counted, marked as
// answered so that it gets no second result and no engine call when it
// comes back, and the worker takes no new work for a pause that doubles
// while dead-lettering keeps failing (Config.RetryBackoff up to
// RetryBackoffMax), saying so in Ready. No request is dropped for it. The ack / requeue / dead-letter decision is made in one
// function, settle, which also recovers panics. Faults of the worker rather
// than of a request spend no attempt: a request the engine had no room for
// waits in the worker and is retried, paced; while the engine is down or
// lacks the worker's model, the worker takes nothing (it pauses a broker
// that pushes), hands back what it held with no attempt counted, says so in
// Ready, and probes the engine until it answers.
//
// Concurrency: Run owns a receive loop, a dispatcher (which alone owns the
// batcher), one goroutine per bad delivery being settled, one goroutine per engine call (at most the in-flight limit; each
// also settles its requests after the engine has answered) and, during an
// engine outage, a prober; it waits for all of them. Deliveries in flight
// are bounded by Capacity, 3 × the in-flight limit (at least the limit +
// 32): room for requests waiting for a slot, on the engine, and having
// their results confirmed. A request waits for a slot at most
// Config.MaxWait, then goes back to the queue unspent. Panics in
// the Observer and in the loops are contained and logged.
//
// Shutdown is staged: when Run's context is cancelled the receive loop stops
// and the driver requeues what it had prefetched; waiting requests are
// requeued; running calls get Config.DrainTimeout to finish, after which
// they are cancelled and their deliveries requeued. Settling always runs on
// a context that outlives the cancellation.
package worker
