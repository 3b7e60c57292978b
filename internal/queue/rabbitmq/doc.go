// Package rabbitmq is the RabbitMQ driver for sous, on
// github.com/rabbitmq/amqp091-go.
//
// It keeps one connection with two channels: a consumer channel (manual
// acks, prefetch set by SetPrefetch) and a publisher channel in confirm mode
// with mandatory publishing, so Publish returns only once the broker has
// stored the message in a queue, and reports queue.ErrUnroutable when there
// was none. Open retries a broker it cannot reach until its context ends,
// but not one that refuses access (ErrAccessRefused: credentials, vhost or
// permissions, which are configuration). When the connection drops, a
// supervisor goroutine reconnects
// with backoff; deliveries from the lost channel become stale (settling them
// returns queue.ErrStale, and Stale reports them, so the worker publishes no
// result the redelivered copy would duplicate) and the broker redelivers
// them. A consumer the broker cancels (its queue was deleted) is started
// again.
//
// Requeue publishes a copy of the message to the back of the input queue
// with the attempts made so far in the x-sous-attempts header (confirmed),
// then acks the original. Attempts therefore count on every queue type, and
// a worker's shutdown (reason queue.ReasonShutdown) does not count as one.
// The attempt of a delivery is x-sous-attempts plus the broker's own count of
// failed deliveries (quorum queues' x-delivery-count, which grows when a
// worker dies holding the message), plus one.
//
// Dead-lettering publishes a copy to the dead-letter queue with the reason in
// headers (confirmed), then acks the original. The input queue is declared
// with the dead-letter queue as its dead-letter target and a delivery limit,
// so a message that keeps killing workers still ends there. With Declare, a
// dead-letter that finds the dead-letter queue deleted declares it again and
// sends the copy once more; without, the error goes to the worker, which
// keeps the request.
//
// The broker path is kept as cheap as a hand-written amqp091-go worker's
// (issue 29, docs/benchmarks.md section 4):
//   - acks are coalesced into multiple acks over runs of delivery tags; an
//     ack no run can cover yet is held for the older delivery's run, for
//     at most 50 ms and at most two thirds of the prefetch; Settle(Ack)
//     hands the ack over and returns, and Close writes the held ones
//     before it closes the connection (acks.go);
//   - a basic.return is matched to its publish by order, queue and ids,
//     with no header added to the message (returns.go);
//   - what amqp091-go writes gathers into as few socket writes as the load
//     allows, with no timer (coalesce.go).
//
// Concurrency: Receive and SetPrefetch must be called from one goroutine (the
// worker's receive loop). Publish, Settle, Ready, Close, Pause, Resume and
// StopReceiving are safe for concurrent use. The consumer's lifecycle has
// one owner at a time (a mutex): a consumer restart (cancel, then consume)
// is one step for Pause and StopReceiving, which never fall between its
// halves; and acks go alone, never as a multiple ack, once a delivery tag is
// missing from the run the driver read. Close stops the supervisor and closes the connection, which
// ends the goroutines each connection starts.
package rabbitmq
