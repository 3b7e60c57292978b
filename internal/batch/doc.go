// Package batch groups work items into batches for the inference engine.
//
// A Batcher is a pure state machine: the caller adds items and asks which
// batches are ready at a given instant, passing the current batch size, the
// number of free engine slots and whether the engine is idle. It owns no
// goroutine and reads no clock, so its policy is tested without sleeping.
//
// The policy (dynamic batching): a group is dispatched when it reaches the
// current size, when the batch window has passed since its oldest item, or at
// once when the engine is idle and no more input is waiting, so low load
// never pays the window. Items that cannot share an engine call (different
// model, kind or options) carry different keys and never share a batch.
//
// Concurrency: a Batcher is not safe for concurrent use; one goroutine (the
// worker's dispatcher) owns it.
package batch
